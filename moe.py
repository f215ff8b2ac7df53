"""
moe.py: mixture of experts, or how to grow parameters without growing the compute per token.

The concept. A dense feed-forward layer runs every weight on every token. A mixture-of-experts
(MoE) layer holds E feed-forward "experts" and a router that sends each token to only k of them:
the layer has E experts' worth of parameters but spends the FLOPs of k. The knobs:
- Activation ratio: k / E of the routed experts run per token (Qwen3-30B-A3B: 8 of 128;
  DeepSeek-V3: 8 of 256). The lower it is, the more parameters per FLOP.
- Granularity: many small experts instead of a few big ones (d_expert well below the dense
  width). The playbook measures it as G = 2 * d_model / d_expert; more, finer experts give the
  router more combinations at equal compute.
- Shared experts: a few experts every token goes through, beside the routed ones (DeepSeek), so
  common knowledge is not learned E times over.
- Sharing one expert bank between several layers: the same experts, different routers.
- Load balancing. Left alone, a router collapses onto a few experts (they get better, so they
  get picked more). Three remedies, all here:
  * the auxiliary loss of Switch / GShard, alpha * E * sum_i f_i * P_i (f_i: the share of
    assignments expert i received; P_i: the mean probability the router gave it), which is 1
    when the load is even and grows as it concentrates;
  * its statistics over the global batch instead of the micro-batch ("Demons in the detail",
    Qwen 2025): a micro-batch of one domain should be allowed to prefer its experts, as long
    as the whole batch balances out;
  * DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores for
    choosing experts only (never to the weights that mix their outputs), nudged after every
    optimizer step by bias += gamma * sign(mean load - load): no gradient fights the language
    modelling loss.
  And the router z-loss (ST-MoE): mean logsumexp(router logits)^2, which keeps the logits
  small so the softmax stays stable in low precision.
- Dispatch: dropless (every assignment is computed: sort the (token, expert) pairs by expert,
  run each expert on its contiguous slice, add the results back with their weights), or with a
  capacity factor (each expert takes at most capacity_factor * N * k / E assignments; the rest
  are dropped, and the token keeps only its residual). Dropless is the modern default; capacity
  exists to show what it costs.

The playbook's lessons: MoE wins at equal compute once there is enough data; finer experts and
a shared expert help; balance over the global batch, not the micro-batch; watch per-expert
load the way you watch the loss, because a collapsed router wastes most of the parameters.

Papers: Shazeer et al. 2017 (sparsely-gated MoE); Lepikhin et al. 2020 (GShard); Fedus et al.
2021 (Switch); Zoph et al. 2022 (ST-MoE: router z-loss); Dai et al. 2024 (DeepSeekMoE: fine-
grained and shared experts); DeepSeek-AI 2024 (DeepSeek-V3: sigmoid routing, aux-loss-free
bias, Wang et al. 2024); Qiu et al. 2025 (global-batch load balancing); Krajewski et al. 2024
(granularity).

Run:
    python moe.py     # a config's activation ratio; a toy MoE trained with no balancing, the
                      # auxiliary loss and the bias method, and each one's expert-load histogram
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Routing

class Router(nn.Module):
    """Scores every expert for every token and picks the top k.

    score="softmax" (Mixtral, Qwen3-MoE): probabilities over experts; the top-k weights are
    optionally renormalised to sum to 1 (norm_topk). score="sigmoid" (DeepSeek-V3): each expert
    gets an independent affinity in (0, 1); the chosen ones are normalised, then multiplied by
    `scale` (DeepSeek's routed_scaling_factor).

    With selection_bias (default for sigmoid) a per-expert bias, DeepSeek-V3's
    e_score_correction_bias, is added to the scores for *choosing* experts only. It is a buffer:
    update_bias moves it from the measured load, the optimizer never sees it."""

    def __init__(self, dim, n_experts, top_k, score="softmax", norm_topk=True, scale=1.0, selection_bias=None):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score must be 'softmax' or 'sigmoid', not {score!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.n_experts, self.top_k, self.score, self.norm_topk, self.scale = n_experts, top_k, score, norm_topk, scale
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.weight, std=0.02)
        if selection_bias if selection_bias is not None else score == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x):
        """x (N, dim) -> logits (N, E) and scores (N, E) in float32, the chosen experts (N, k)
        and their mixing weights (N, k)."""
        # float32: the softmax over experts and the ranking decide routing; bf16 ties would
        # make it depend on rounding.
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        rank = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        chosen = rank.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)          # the bias chose; the scores mix
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, scores, chosen, weights * self.scale


# -----------------------------------------------------------------------------
# Experts

def grouped_mm_reference(x, w, offsets):
    """x (N, K) with its rows sorted by expert, expert e owning rows offsets[e]:offsets[e+1];
    w (E, M, K), each expert an nn.Linear weight. Returns (N, M): every expert's rows times its
    weight. One matmul per expert: E launches, and a host sync to read the offsets."""
    bounds = offsets.tolist()
    return torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e].t() for e in range(w.shape[0])])


grouped_mm = grouped_mm_reference


class Experts(nn.Module):
    """E SwiGLU experts of width d_expert, stored as two 3-D weights, (E, 2 d_expert, dim) for
    gate and up together and (E, dim, d_expert) for down: the layout of transformers'
    Qwen3MoeExperts, and the one a grouped GEMM reads."""

    def __init__(self, n_experts, dim, d_expert):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, d_expert))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x, offsets):
        gate, up = grouped_mm(x, self.gate_up_proj, offsets).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, offsets)


class SharedExperts(nn.Module):
    """The always-on experts: n_shared of them are one SwiGLU of n_shared * d_expert (DeepSeek's
    shared_experts, same parameter names)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# The layer

class MoE(nn.Module):
    """A router, E routed experts (k per token), optional shared experts, and load balancing.

    forward(x) returns the layer's output and leaves two things on the module for the model to
    collect: `loss`, the differentiable balancing terms (aux_loss * balance + z_loss * router
    z-loss, 0 when both coefficients are 0) and `stats`, detached per-expert statistics.

    Balance statistics: f (the share of assignments per expert) comes from this micro-batch
    (global_stats=False) or from `counts`, every assignment since the last end_step, summed
    over data-parallel ranks (global_stats=True). Across ranks that is exact; across the
    micro-batches of one optimizer step it is a running estimate, because later micro-batches
    have not been routed yet when an earlier one takes its gradient (Megatron's global aux loss
    does the same). P (the mean router probability) is always this micro-batch's own: it carries
    the gradient."""

    def __init__(self, dim, n_experts, top_k, d_expert, n_shared=0, score="softmax", norm_topk=True, scale=1.0,
                 selection_bias=None, capacity_factor=None, aux_loss=0.0, z_loss=0.0, global_stats=False,
                 experts=None):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.aux_loss, self.z_loss, self.global_stats = aux_loss, z_loss, global_stats
        self.gate = Router(dim, n_experts, top_k, score, norm_topk, scale, selection_bias)
        # One bank may serve several layers: pass the first layer's Experts to the others.
        self.experts = experts if experts is not None else Experts(n_experts, dim, d_expert)
        self.shared_experts = SharedExperts(dim, n_shared * d_expert) if n_shared else None
        # Assignments per expert since the last end_step (training only): the global-batch
        # statistics, the bias update's measure of load, and what gets logged.
        self.register_buffer("counts", torch.zeros(n_experts), persistent=False)
        self.loss, self.stats = None, {}

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.shape[0], self.n_experts, self.top_k
        logits, scores, chosen, weights = self.gate(x)

        # Dispatch: the N*k (token, expert) assignments sorted by expert, stable so that
        # within an expert tokens keep their order (capacity then drops the latest ones).
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * N * k / E)
            first = counts.cumsum(0) - counts                       # each expert's first slot in `order`
            rank = torch.arange(N * k, device=x.device) - first[flat[order]]
            order = order[rank < capacity]
            routed = counts.clamp(max=capacity)
        else:
            routed = counts
        token = order // k                                          # which token each assignment is
        offsets = F.pad(routed.cumsum(0), (1, 0))
        out = self.experts(x[token], offsets) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)

        # Counting is for training steps: not evaluation (no_grad) nor generation (eval mode).
        counting = self.training and torch.is_grad_enabled()
        self.loss = self._balance(logits, scores, counts, N * k, counting)
        dropped = N * k - routed.sum()
        load = self.counts if counting else counts.float()
        load = load / load.sum().clamp(min=1) * E                   # 1.0 = an even share
        share = load / E
        self.stats = {"min_load": load.min().detach(), "max_load": load.max().detach(),
                      # entropy of the load, divided by log E: 1 when even, 0 when one expert takes all
                      "load_entropy": -(share * share.clamp(min=1e-12).log()).sum().detach() / math.log(E),
                      "dropped": (dropped / (N * k)).float().detach()}
        return y.reshape(shape)

    def _balance(self, logits, scores, counts, n_assignments, counting):
        if counting:
            step = counts.float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(step)       # every rank's routing: global statistics, and equal biases
            self.counts += step
        loss = logits.new_zeros(())
        if self.aux_loss:
            if self.global_stats and counting:
                f = self.counts / self.counts.sum()
            else:
                f = counts.float() / n_assignments
            # P from a distribution over experts: sigmoid scores are normalised per token first.
            probs = scores if self.gate.score == "softmax" else scores / scores.sum(-1, keepdim=True)
            loss = loss + self.aux_loss * self.n_experts * (f * probs.mean(0)).sum()
        if self.z_loss:
            loss = loss + self.z_loss * logits.logsumexp(-1).pow(2).mean()
        return loss


@torch.no_grad()
def end_step(model, bias_rate=0.0):
    """After each optimizer step: DeepSeek-V3's bias update for every router that has a
    selection bias (bias += bias_rate * sign(mean load - load), on the load counted since the
    last call, identical on every rank), then the counts start again. Returns the number of
    MoE layers seen."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in layers:
        bias = m.gate.e_score_correction_bias
        if bias_rate and bias is not None and m.counts.sum() > 0:
            bias += bias_rate * torch.sign(m.counts.mean() - m.counts)
        m.counts.zero_()
    return len(layers)


def describe(dim, n_experts, top_k, d_expert, n_shared=0):
    """The numbers the playbook compares MoE configs by, for one layer."""
    per_expert = 3 * dim * d_expert
    total = (n_experts + n_shared) * per_expert + n_experts * dim          # + the router
    active = (top_k + n_shared) * per_expert + n_experts * dim
    return {"total_params": total, "active_params": active, "activation_ratio": top_k / n_experts,
            "active_fraction": active / total, "granularity": 2 * dim / d_expert}


# -----------------------------------------------------------------------------
# Demo

def _demo(steps=200):
    torch.manual_seed(0)
    print("Qwen3-30B-A3B's MoE layer (d_model 2048, 128 experts of 768, top 8) and DeepSeek-V3's"
          " (7168, 256 of 2048, top 8, one shared):")
    for name, cfg in [("Qwen3-30B-A3B", (2048, 128, 8, 768, 0)), ("DeepSeek-V3", (7168, 256, 8, 2048, 1))]:
        d = describe(*cfg)
        print(f"  {name:14s} {d['total_params'] / 1e6:7.1f}M params, {d['active_params'] / 1e6:6.1f}M active "
              f"({100 * d['active_fraction']:.1f}%), {cfg[2]} of {cfg[1]} routed experts, granularity {d['granularity']:.1f}")

    # A toy task that rewards specialisation: inputs from 8 clusters, each cluster's target a
    # different linear map. The router starts skewed toward expert 0, as real routers drift.
    dim, E, k = 32, 8, 2
    centers, maps = torch.randn(E, dim) * 3, torch.randn(E, dim, dim) / math.sqrt(dim)

    def batch(n=256):
        c = torch.randint(0, E, (n,))
        x = centers[c] + torch.randn(n, dim)
        return x, torch.einsum("nd,nde->ne", x, maps[c])

    print(f"\ntoy task: {E} clusters, {E} experts, top {k}, {steps} Adam steps; load = share of assignments x {E}")
    for name, kw, rate in [("no balancing", dict(), 0.0), ("aux loss 0.1", dict(aux_loss=0.1), 0.0),
                           ("bias (DeepSeek-V3)", dict(score="sigmoid"), 1e-2)]:
        torch.manual_seed(1)
        layer = MoE(dim, E, k, 64, **kw)
        with torch.no_grad():
            layer.gate.weight[0] += 0.5 * centers.mean(0) / centers.mean(0).norm()
        opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
        for step in range(steps):
            x, y = batch()
            loss = F.mse_loss(layer(x), y) + layer.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step < steps - 20:
                end_step(layer, rate)      # the last 20 steps accumulate the load shown below
        load = layer.counts / layer.counts.sum() * E
        x, y = batch(4096)
        with torch.no_grad():
            mse = F.mse_loss(layer.eval()(x), y).item()
        bars = " ".join(f"{v:4.2f}" for v in load.tolist())
        print(f"  {name:19s} held-out mse {mse:6.3f}   load per expert: {bars}  (max {load.max():.2f})")


if __name__ == "__main__":
    _demo()

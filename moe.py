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
- Group-limited routing (DeepSeek-V3): experts in groups, each token's experts drawn from a
  few groups only, which bounds how many devices its activations visit under expert parallelism.
- Load balancing. Left alone, a router collapses onto a few experts (they get better, so they
  get picked more). Three remedies, all here:
  * the auxiliary loss of Switch / GShard, alpha * E * sum_i f_i * P_i (f_i: the share of
    assignments expert i received; P_i: the mean probability the router gave it), which is 1
    when the load is even and grows as it concentrates (Megatron's scale; Hugging Face's
    load_balancing_loss_func counts f_i per token, so top_k at balance: model.py converts);
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
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:     # macOS, or a CPU-only install: the PyTorch reference runs
    triton = None


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
    update_bias moves it from the measured load, the optimizer never sees it.

    Group-limited routing (DeepSeek-V3, n_group > 1): the experts are split into n_group equal
    groups (in DeepSeek's deployment, one per node), and a token may use experts of only
    topk_group of them, the groups whose two best selection scores sum highest. It caps how many
    nodes each token's activations travel to; with n_group = 1 it changes nothing."""

    def __init__(self, dim, n_experts, top_k, score="softmax", norm_topk=True, scale=1.0, selection_bias=None,
                 n_group=1, topk_group=1):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score must be 'softmax' or 'sigmoid', not {score!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if n_group < 1 or n_experts % n_group or not 1 <= topk_group <= n_group \
                or top_k > topk_group * (n_experts // n_group):
            raise ValueError(f"n_group={n_group}, topk_group={topk_group}: want groups that divide n_experts="
                             f"{n_experts}, 1 <= topk_group <= n_group, and top_k={top_k} experts within the "
                             f"chosen groups")
        self.n_experts, self.top_k, self.score, self.norm_topk, self.scale = n_experts, top_k, score, norm_topk, scale
        self.n_group, self.topk_group = n_group, topk_group
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
        if self.n_group > 1:
            groups = rank.view(rank.shape[0], self.n_group, -1)                 # (N, groups, experts per group)
            group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            rank = groups.masked_fill(~keep[..., None], float("-inf")).view_as(rank)
        chosen = rank.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)          # the bias chose; the scores mix
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, scores, chosen, weights * self.scale


# -----------------------------------------------------------------------------
# Experts

# The grouped GEMM. After routing, an MoE layer holds N (token, expert) assignments. Sort them by
# expert and each expert owns one contiguous run of rows of x (N, K): rows offsets[e] to
# offsets[e+1]. Every expert then applies its own weight, w[e] (M, K) in nn.Linear's layout
# (out_features, in_features), to its run: y_e = x_e @ w[e]^T. The runs have different lengths,
# decided by the router at run time, and some are empty.
#
# The obvious code is a Python loop of E small matmuls (`grouped_mm_reference` below). It has two
# costs on a GPU. The loop needs each run's length on the host, so it waits for the router's
# result (a device-to-host sync, a stall in every layer, and no CUDA graphs). And each expert's
# matmul is small: with 64 fine-grained experts each launch fills a fraction of the GPU. A
# grouped GEMM does all experts in one launch that knows the run lengths only on the device.
#
# How the kernel here does it (the "tile schedule" of MegaBlocks and of Triton's grouped-GEMM
# tutorial, built without a sync):
# - The output is cut into tiles of BLOCK_M rows x BLOCK_N columns, and a tile of rows never
#   crosses from one expert into the next (its rows must all meet the same w[e]). An expert with
#   c rows needs ceil(c / BLOCK_M) row tiles: its last one is partly empty, an empty expert has
#   none.
# - The number of row tiles is known only on the device, but it is bounded from the shapes
#   alone: sum_e ceil(c_e / BLOCK_M) < sum_e (c_e / BLOCK_M + 1) = N / BLOCK_M + E, so
#   cdiv(N, BLOCK_M) + E row tiles always suffice. The launch grid takes that bound; a few torch
#   ops on the device (cumsum, searchsorted) give each row tile its expert and its first row, and
#   the programs past the real tiles return at once. The "+ E" is real: one token for each of
#   E experts needs E tiles where cdiv(N, BLOCK_M) is 1.
# - Each program computes its tile as an ordinary tiled matmul: a loop over K in BLOCK_K chunks,
#   float32 accumulation, masked tails (the end of the expert's rows, M, K).
# The backward reuses both. dx_e = dy_e @ w[e] is the same kernel: the kernel reads w through
# its strides for (expert, out, in), so swapping the last two strides makes it read w[e]^T. And
# dw[e] = dy_e^T @ x_e is a second kernel, one program per (expert, tile of w[e]), that walks down
# the expert's rows (their bounds read from offsets inside the kernel); an expert with no rows
# writes zeros, which is its true gradient.
#
# Papers: Gale et al. 2022 (MegaBlocks); Triton's grouped GEMM tutorial.

# Launch settings: the forward kernel's tile (BLOCK_M rows of one expert x BLOCK_N outputs,
# BLOCK_K inputs per step; dx reuses it), and the dW kernel's (a BLOCK_M x BLOCK_K tile of
# w[e], summed BLOCK_R rows at a time), with warps and pipelining stages; "small" for 16-bit
# inputs, "big" for float32, whose tiles take twice the shared memory. The 16-bit ones were
# chosen on an H100 with `python bench.py tune` (BENCHMARKS.md: 128 x 256 x 64 is 2.8-4x
# faster than 64 x 64 x 32 there); float32 keeps the untimed 64 x 64 x 32 that passed its
# tests. tl.dot needs every dimension >= 16; the tests shrink every tile to 16.
GG_TILES = {
    "small": {"fwd": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
              "dw": dict(BLOCK_M=128, BLOCK_K=256, BLOCK_R=64, num_warps=8, num_stages=3)},
    "big": {"fwd": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
            "dw": dict(BLOCK_M=64, BLOCK_K=32, BLOCK_R=64, num_warps=4, num_stages=3)},
}


def kernels_on(t):
    """Whether the Triton kernels run for tensor t: on CUDA, when Triton is installed, unless the
    environment says NANOPLAYBOOK_KERNELS=0 (as attention.kernels_on; a leaf keeps its own).
    The tests turn them on for CPU tensors under Triton's interpreter."""
    return triton is not None and t.is_cuda and os.environ.get("NANOPLAYBOOK_KERNELS", "1") != "0"


def _grouped_mm_check(x, w, offsets):
    """Shape errors that name the shapes. The offsets' values (sorted, from 0 to N) are not
    checked here: that would need them on the host, which is the sync the kernels avoid."""
    if x.dim() != 2:
        raise ValueError(f"grouped_mm: x must be 2-D (tokens, in_features), got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"grouped_mm: w must be 3-D (experts, out_features, in_features), "
                         f"got shape {tuple(w.shape)}")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"grouped_mm: w {tuple(w.shape)} takes {w.shape[2]} input features per expert, "
                         f"x {tuple(x.shape)} has {x.shape[1]}")
    if w.shape[0] == 0:
        raise ValueError(f"grouped_mm: w {tuple(w.shape)} holds no experts")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] + 1:
        raise ValueError(f"grouped_mm: offsets must have E + 1 = {w.shape[0] + 1} entries for w {tuple(w.shape)}, "
                         f"got shape {tuple(offsets.shape)}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"grouped_mm: offsets must be integers (int64), not {offsets.dtype}")
    if offsets.device != x.device:
        raise ValueError(f"grouped_mm: offsets are on {offsets.device}, x on {x.device}: they must share a device")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x ({x.dtype}) and w ({w.dtype}) must share a dtype")


def grouped_mm_reference(x, w, offsets):
    """y = x_e @ w[e]^T for each expert e, where x (N, K) holds the tokens sorted by expert and
    expert e owns rows offsets[e]:offsets[e+1]; w (E, M, K); offsets (E + 1,) integers with
    offsets[0] = 0 and offsets[E] = N. Returns (N, M) in x's dtype. The readable loop: one
    matmul per expert, autograd differentiates it as it stands (an empty expert gets a zero
    gradient from its empty matmul)."""
    _grouped_mm_check(x, w, offsets)
    bounds = offsets.tolist()   # on the host: the sync the kernels avoid, and what lets us check the values
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"grouped_mm: offsets must rise from 0 to N = {x.shape[0]}, got {bounds}")
    return torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])


def _tile_schedule(offsets, n_rows, block_m):
    """The forward grid's row tiles, on offsets' device and without a sync: for each of the
    cdiv(n_rows, block_m) + E tiles the grid launches, its expert (E for the spare tiles past
    the real ones, which return at once) and its first row. Tiles never cross an expert's end."""
    E = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m        # ceil: an expert's last tile may be partly empty
    ends = tiles.cumsum(0)                           # tile index one past each expert's last tile
    bound = -(-n_rows // block_m) + E                # > sum_e ceil(c_e / block_m), see the docstring
    t = torch.arange(bound, device=offsets.device)
    # The expert of tile t: how many experts end at or before it. Empty experts end where the
    # previous one does, so they own no tile; every tile past the last real one gets E.
    expert = torch.searchsorted(ends, t, right=True)
    e = expert.clamp(max=E - 1)                      # spare tiles: any valid index, their row is never read
    row = offsets[e] + (t - (ends - tiles)[e]) * block_m
    return expert, row


if triton is not None:
    @triton.jit
    def _grouped_mm_kernel(X, W, Y, OFFSETS, TILE_EXPERT, TILE_ROW, E, M, K,
                           sxn, sxk, swe, swm, swk, syn, sym,
                           PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        # Y[r, :M] = X[r, :K] @ W[e]^T for the BLOCK_M rows r of one row tile, all of expert e,
        # and BLOCK_N of the M output columns. W is read through its strides for (expert, out,
        # in): the backward passes w with "out" and "in" swapped to get dy @ w[e].
        tile, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(TILE_EXPERT + tile)
        if e >= E:       # a spare tile: the grid is an upper bound, the real count lives on the device
            return
        e = e.to(tl.int64)   # int64: e * swe passes 2^31 for large expert banks (256 x 7168 x 2048)
        row_end = tl.load(OFFSETS + e + 1)                     # int64: the expert's rows stop here
        rows = tl.load(TILE_ROW + tile) + tl.arange(0, BLOCK_M)  # int64: rows * sxn passes 2^31 at long N
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < row_end, cols < M
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + ks < K
            a = tl.load(X + rows[:, None] * sxn + (k0 + ks)[None, :] * sxk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # W[e]^T's (BLOCK_K, BLOCK_N) block, read in place: no transposed copy of w anywhere
            b = tl.load(W + e * swe + (k0 + ks)[:, None] * swk + cols[None, :] * swm,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(a, b, input_precision=PREC)
        tl.store(Y + rows[:, None] * syn + cols[None, :] * sym, acc.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_mm_dw_kernel(DY, X, DW, OFFSETS, M, K,
                              sdn, sdm, sxn, sxk, swe, swm, swk,
                              PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_R: tl.constexpr):
        # DW[e][m, k] = sum over the expert's rows r of DY[r, m] * X[r, k], for one BLOCK_M x
        # BLOCK_K tile of w[e]. The sum runs down the rows BLOCK_R at a time; no row tile is
        # shared between experts, so no atomics and no schedule: the bounds come from offsets.
        e = tl.program_id(0).to(tl.int64)
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok, k_ok = ms < M, ks < K
        start = tl.load(OFFSETS + e)          # int64 row bounds
        count = (tl.load(OFFSETS + e + 1) - start).to(tl.int32)   # one expert's rows fit in int32
        rs = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for r0 in range(0, count, BLOCK_R):   # no rows: no iterations, and the zeros below are stored
            r_ok = r0 + rs < count
            rows = start + r0 + rs            # int64 before it meets a stride
            dyt = tl.load(DY + rows[None, :] * sdn + ms[:, None] * sdm,       # dy_e^T block, (BLOCK_M, BLOCK_R)
                          mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            xb = tl.load(X + rows[:, None] * sxn + ks[None, :] * sxk,         # x_e block, (BLOCK_R, BLOCK_K)
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(dyt, xb, input_precision=PREC)
        tl.store(DW + e * swe + ms[:, None] * swm + ks[None, :] * swk, acc.to(DW.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])


def _dot_precision(t):
    # float32 inputs: exact float32 products ("ieee"), so the kernel agrees with the reference
    # to rounding; tf32 would keep only 10 mantissa bits. For fp16/bf16 inputs the setting
    # changes nothing (they multiply exactly on the tensor cores either way).
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _grouped_mm_launch(a, w, w_strides, out, offsets, expert, row, tiles):
    """out[r] = a[r] @ w[e]^T for the rows r of each expert e, on the tile schedule (expert, row)
    made with tiles["BLOCK_M"]; w_strides are w's strides for (expert, out, in), out's columns its "out"."""
    n_out, n_in = out.shape[1], a.shape[1]
    if out.numel() == 0:     # no rows or no columns: nothing to write (and an empty grid is an error)
        return
    grid = (expert.shape[0], triton.cdiv(n_out, tiles["BLOCK_N"]))
    _grouped_mm_kernel[grid](a, w, out, offsets, expert, row, w.shape[0], n_out, n_in,
                             *a.stride(), *w_strides, *out.stride(), PREC=_dot_precision(a), **tiles)


class GroupedMM(torch.autograd.Function):
    """grouped_mm on the Triton kernels: forward y = x_e @ w[e]^T, backward dx_e = dy_e @ w[e]
    (the forward kernel on w's swapped strides) and dw[e] = dy_e^T @ x_e. Nothing here reads a
    device value on the host, so it never waits for the router and can be captured in a graph."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        offsets = offsets.to(torch.int64)    # the kernels read int64 row bounds (a no-op if already)
        # Kept for the backward, which must use the schedule's tile size.
        ctx.tiles = tiles = GG_TILES["big" if x.dtype == torch.float32 else "small"]
        expert, row = _tile_schedule(offsets, x.shape[0], tiles["fwd"]["BLOCK_M"])
        y = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
        _grouped_mm_launch(x, w, w.stride(), y, offsets, expert, row, tiles["fwd"])
        ctx.save_for_backward(x, w, offsets, expert, row)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, expert, row = ctx.saved_tensors
        dy = dy.to(x.dtype)   # autograd already hands dy in y's dtype; tl.dot needs both operands alike
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dx_e = dy_e @ w[e]: the forward kernel with dy as its input and w[e]^T as the weight,
            # i.e. w read with its "out" (M) and "in" (K) strides swapped. The row tiles are the same.
            dx = torch.empty_like(x)
            _grouped_mm_launch(dy, w, (w.stride(0), w.stride(2), w.stride(1)), dx, offsets, expert, row,
                               ctx.tiles["fwd"])
        if ctx.needs_input_grad[1]:
            E, M, K = w.shape
            dw = torch.empty_like(w)
            tiles = ctx.tiles["dw"]
            grid = (E, triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(K, tiles["BLOCK_K"]))
            # Each program sums over all of one expert's rows: a heavily loaded expert makes long
            # programs, but there are still cdiv(M, BM) * cdiv(K, BK) of them per expert.
            _grouped_mm_dw_kernel[grid](dy, x, dw, offsets, M, K, *dy.stride(), *x.stride(), *dw.stride(),
                                        PREC=_dot_precision(x), **tiles)
        return dx, dw, None


def grouped_mm(x, w, offsets):
    """y = x_e @ w[e]^T for each expert e: x (N, K) sorted by expert, w (E, M, K) in nn.Linear's
    layout, offsets (E + 1,) int64 on x's device, offsets[0] = 0, offsets[E] = N, expert e owns
    rows offsets[e]:offsets[e+1] (possibly none). Returns (N, M) in x's dtype. On CUDA (where
    `kernels_on` says so) the Triton kernels run, without a device-to-host sync; elsewhere
    `grouped_mm_reference`. The kernels trust the offsets' values: checking them needs a sync."""
    if x.dim() == 2 and w.dim() == 3 and torch.is_autocast_enabled(x.device.type):
        # Under autocast, as nn.Linear: both operands in the autocast dtype (bf16 on CUDA), so the
        # kernel runs on the tensor cores; the casts carry the gradients back to float32 weights.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    _grouped_mm_check(x, w, offsets)
    if kernels_on(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return GroupedMM.apply(x, w, offsets)
    return grouped_mm_reference(x, w, offsets)


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


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): one expert, and the always-on shared experts (n_shared of
    them are one SwiGLU of n_shared * d_expert: DeepSeek's shared_experts, same parameter
    names). model.py's dense MLP is this same module."""

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
                 experts=None, n_group=1, topk_group=1):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.aux_loss, self.z_loss, self.global_stats = aux_loss, z_loss, global_stats
        self.gate = Router(dim, n_experts, top_k, score, norm_topk, scale, selection_bias, n_group, topk_group)
        # One bank may serve several layers: pass the first layer's Experts to the others.
        self.experts = experts if experts is not None else Experts(n_experts, dim, d_expert)
        self.shared_experts = SwiGLU(dim, n_shared * d_expert) if n_shared else None
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

"""Tests for parallel.py's tensor parallelism, with gloo processes on this CPU
(torch.multiprocessing): TP over 2 ranks (two such groups side by side) and over 4, on the
same full batch, equals one process (logits, log-probs, greedy generation, losses, gradient
norms, weights after 3 clipped AdamW steps); the
vocabulary-parallel cross-entropy and log-probs equal the full-logit ones, values and
gradients; the replica check catches the SmolLM3 seed bug and a diverged replica; the refused
configurations say why. The four processes are spawned once (a module fixture) and run every
scenario, because starting processes costs more than the scenarios themselves."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import spawn
import parallel as tp
from model import Model, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

SMALL = dict(vocab_size=256, n_layer=2, dim=32, n_head=4, n_kv_head=2, mlp_dim=64, max_seq_len=64)
CASES2 = {   # tp = 2
    "tied": {},
    "untied": dict(tie_embeddings=False),
    "kv_replicated": dict(n_kv_head=1),
    "qk_norm_bias_z": dict(qk_norm=True, attn_bias=True, z_loss=1e-2, tie_embeddings=False),
}
CASES4 = {   # tp = 4: KV heads replicated in pairs, and one KV head on all four ranks
    "kv_pairs": dict(n_kv_head=2, qk_norm=True),
    "kv_mqa": dict(n_kv_head=1),
}
CLIP = 0.5


def _batch(rows=4, T=16):
    return torch.randint(0, 256, (rows, T + 1), generator=torch.Generator().manual_seed(1))


def _train(model, x, sharded=False, group=None, steps=3):
    """AdamW steps on the whole batch x, the gradient clipped to CLIP (by parallel.py's global
    norm when sharded). Returns the losses and the gradient norms before clipping.
    eps 1e-6, not the default 1e-8: Adam's first step is lr * g / (|g| + eps), whose slope
    lr eps / (|g| + eps)^2 peaks at lr / eps where g ~ 0. TP sums the same products in another
    order, and a gradient that nearly cancels (an embedding row of a token absent from the
    batch: -6.04e-8 here, -6.08e-8 under TP) then moves its weight differently: by 1.2e-5 with
    eps 1e-8, over the tolerance; eps 1e-6 flattens the slope a hundredfold. A missing or
    doubled gradient is still off by a whole step (lr = 1e-2)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
    losses, norms = [], []
    for _ in range(steps):
        _, loss, _ = model(x[:, :-1], labels=x[:, 1:])
        loss.backward()
        if sharded:
            norms.append(tp.clip_grad_norm_(list(model.parameters()), CLIP, group, _copies(model, group)).item())
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


def _copies(model, group):
    """How many ranks hold each parameter's piece alike (clip_grad_norm_'s copies): one for a
    shard, tp for a replicated parameter, tp / n_kv_head for a replicated K/V head."""
    return [dist.get_world_size(group) // getattr(p, "tp_slots", 1) for p in model.parameters()]


def _full_state_dict(model, group):
    """The unsharded state dict (the names and shapes of the model before tensor_parallel)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: tp.tp_full(t, params.get(name), group) for name, t in model.state_dict().items()}


def _log_probs(model, x):
    labels = x[:, 1:].clone()
    labels[0, :3] = -100
    return model.log_probs(x[:, :-1], labels, temperature=0.8).detach()


@functools.lru_cache
def _reference(cfg):
    cfg = dict(cfg)
    torch.manual_seed(0)
    model = Model(ModelConfig(**{**SMALL, **cfg}))
    x = _batch()
    logits = model(x[:, :-1])[0].detach()
    log_probs = _log_probs(model, x)
    gen = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=0)
    losses, norms = _train(model, x)
    return dict(logits=logits, log_probs=log_probs, gen=gen, losses=losses, norms=norms,
                weights={k: v.detach().clone() for k, v in model.state_dict().items()})


# -----------------------------------------------------------------------------
# What each rank runs

def _equivalence(cases, group):
    out = {}
    for name, cfg in cases.items():
        torch.manual_seed(0)
        model = tp.tensor_parallel(Model(ModelConfig(**{**SMALL, **cfg})), group)
        x = _batch()
        r = dict(logits=model(x[:, :-1])[0].detach(), log_probs=_log_probs(model, x),
                 gen=model.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=0),
                 heads=(model.layers[0].self_attn.n_head, model.layers[0].self_attn.n_kv_head),
                 problems_before=tp.check_replicas(model, group))
        r["losses"], r["norms"] = _train(model, x, True, group)
        r["weights"] = _full_state_dict(model, group)
        r["problems_after"] = tp.check_replicas(model, group)
        out[name] = r
    return out


def _cross_entropy(group):
    """The head alone on random h and W: loss, token_ce, z, dh, dW; forward logits; log-probs."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=g)
    w = torch.randn(16, 8, generator=g)
    labels = torch.tensor([0, 15, 7, 8, 3, 12, 1, 9, 8, 7])    # both halves of the vocabulary
    linear = torch.nn.Linear(8, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    head = tp.VocabParallelHead(linear, group)
    hh = h.clone().requires_grad_()
    loss, token_ce, z = head.loss(hh, labels, 0.1)
    loss.backward()
    dw = [torch.empty_like(head.weight.grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(dw, head.weight.grad, group=group)
    logits = head(h)
    hl = h.view(2, 5, 8).clone().requires_grad_()
    lab = labels.view(2, 5).clone()
    lab[0, 1] = -100
    lp = head.log_probs(hl, lab, temperature=0.7)
    lp.sum().backward()
    return dict(loss=loss.detach(), token_ce=token_ce, z=z, dh=hh.grad, dw=torch.cat(dw), logits=logits.detach(),
                log_probs=lp.detach(), dh_lp=hl.grad)


def _seed_bug(group):
    out = {}
    torch.manual_seed(0)
    model = tp.tensor_parallel(Model(ModelConfig(**SMALL)), group)
    out["sliced"] = tp.check_replicas(model, group)
    torch.manual_seed(0)                       # the bug: every rank initialises its shards alike
    model.reset_parameters()
    out["same_seed"] = tp.check_replicas(model, group)
    torch.manual_seed(tp.tp_seed(0, group))    # the fix
    model.reset_parameters()
    out["tp_seed"] = tp.check_replicas(model, group)
    with torch.no_grad():                      # a replica drifts on one rank
        if dist.get_rank(group) == 1:
            model.layers[0].input_layernorm.weight[3] += 1e-3
    out["drift"] = tp.check_replicas(model, group)
    # Replicated KV heads drawn from the per-rank seed differ
    torch.manual_seed(0)
    model = tp.tensor_parallel(Model(ModelConfig(**{**SMALL, "n_kv_head": 1})), group)
    torch.manual_seed(tp.tp_seed(0, group))
    model.reset_parameters()
    out["kv_tp_seed"] = tp.check_replicas(model, group)
    return out


REFUSED = {
    "MLA": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "Mamba-2": dict(mixers="MA", ssm_head_dim=16, ssm_state=8, ssm_chunk=8),
    "MoE": dict(n_experts=4, top_k=2, d_expert=16),
    "n_head (3)": dict(n_head=3, n_kv_head=1, dim=48),
    "n_kv_head (3)": dict(n_head=6, n_kv_head=3, dim=48),
    "mlp_dim (67)": dict(mlp_dim=67),
    "padded_vocab (255)": dict(vocab_size=255, vocab_multiple=1),
}


def _refusals(group):
    out = {}
    for name, cfg in REFUSED.items():
        try:
            tp.tensor_parallel(Model(ModelConfig(**{**SMALL, **cfg})), group)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def _worker(rank, store, out):
    """Four ranks: two TP=2 groups side by side ({0, 1} and {2, 3}: the layout of 2-way data
    parallelism over 2-way TP, and a check that nothing assumes the default group), then TP=4
    over all of them."""
    torch.set_num_threads(1)     # the ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]    # every rank creates every group
    pair = pairs[rank // 2]
    results = {"equivalence2": _equivalence(CASES2, pair), "cross_entropy": _cross_entropy(pair),
               "seed_bug": _seed_bug(pair), "refusals": _refusals(pair),
               "equivalence4": _equivalence(CASES4, None)}
    torch.save(results, f"{out}.{rank}")
    # every rank done before any tears down: a rank that exits while another's last gloo
    # exchange is in flight can abort it ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results: one set of processes for all the tests (starting them, and their
    gloo rendezvous, is what costs)."""
    tmp = tmp_path_factory.mktemp("tp")
    spawn(_worker, args=(str(tmp / "store"), str(tmp / "out")), nprocs=4)
    return [torch.load(tmp / f"out.{r}") for r in range(4)]


# -----------------------------------------------------------------------------
# The tests

def _same_as_one_process(ranks, cases, world):
    for name, cfg in cases.items():
        want = _reference(tuple(cfg.items()))
        for rank, res in enumerate(ranks):
            got = res[f"equivalence{world}"][name]
            msg = f"{name}, rank {rank}"
            n_kv = cfg.get("n_kv_head", SMALL["n_kv_head"])
            assert got["heads"] == (SMALL["n_head"] // world, max(n_kv // world, 1)), msg
            assert got["problems_before"] == [] and got["problems_after"] == [], msg
            for k in ("logits", "log_probs"):
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda s: f"{msg} {k}: {s}")
            assert got["gen"] == want["gen"], msg
            torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=1e-5, msg=lambda s: f"{msg}: {s}")
            torch.testing.assert_close(got["norms"], want["norms"], rtol=1e-5, atol=1e-5, msg=lambda s: f"{msg}: {s}")
            assert got["weights"].keys() == want["weights"].keys(), msg
            for k, w in want["weights"].items():
                torch.testing.assert_close(got["weights"][k], w, rtol=1e-5, atol=1e-5, msg=lambda s: f"{msg} {k}: {s}")


def test_tp2_equals_one_process(ranks):
    """Tied and untied heads, split and replicated KV heads, QK-norm + q/k/v biases + z-loss:
    the same logits, log-probs, greedy tokens, losses, gradient norms and, after 3 clipped AdamW steps,
    the same full weights as one process; every rank holds the same replicas throughout."""
    assert any(n > CLIP for n in _reference(())["norms"])     # the clipping is exercised
    _same_as_one_process(ranks, CASES2, 2)


def test_tp4_replicated_kv_pairs_equal_one_process(ranks):
    """Four ranks: two KV heads, each shared by a pair of ranks (their gradients summed within
    the pair), and a single KV head on all four."""
    _same_as_one_process(ranks, CASES4, 4)


def test_vocab_parallel_cross_entropy_matches_full_logits(ranks):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=g).requires_grad_()
    w = torch.randn(16, 8, generator=g).requires_grad_()
    labels = torch.tensor([0, 15, 7, 8, 3, 12, 1, 9, 8, 7])
    logits = h @ w.t()
    lse = logits.logsumexp(-1)
    loss = F.cross_entropy(logits, labels) + 0.1 * lse.pow(2).mean()
    loss.backward()
    token_ce = F.cross_entropy(logits, labels, reduction="none").detach()
    hl = h.detach().view(2, 5, 8).clone().requires_grad_()
    lab = labels.view(2, 5).clone()
    lab[0, 1] = -100
    lp = (hl @ w.detach().t() / 0.7).log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1)
    lp = lp.masked_fill(lab == -100, 0.0)
    lp.sum().backward()
    want = dict(loss=loss.detach(), token_ce=token_ce, z=lse.pow(2).mean().detach(), dh=h.grad, dw=w.grad,
                logits=logits.detach(), log_probs=lp.detach(), dh_lp=hl.grad)
    for rank, res in enumerate(ranks):
        got = res["cross_entropy"]
        assert got["token_ce"].dtype == torch.float32 and not got["token_ce"].requires_grad
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda s: f"rank {rank} {k}: {s}")


def test_replica_check_catches_the_seed_bug(ranks):
    for res in ranks:
        got = res["seed_bug"]
        assert got["sliced"] == []                     # sliced from one full model: healthy
        flagged = {name for name, _ in got["same_seed"]}
        # every randomly initialised shard repeats; the tied head is the embedding's Parameter
        assert flagged == {"embed_tokens.weight"} | {f"layers.{i}.{m}.weight" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        assert all("same seed" in why for _, why in got["same_seed"])
        assert got["tp_seed"] == []
        assert [name for name, _ in got["drift"]] == ["layers.0.input_layernorm.weight"]
        assert "replicated" in got["drift"][0][1]
        # one KV head on both ranks must be identical: a per-rank init breaks it
        assert {name for name, _ in got["kv_tp_seed"]} == {
            f"layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("k_proj", "v_proj")}
    assert ranks[0]["seed_bug"] == ranks[1]["seed_bug"]    # one verdict on every rank of a group


def test_refused_configurations_say_why(ranks):
    for res in ranks:
        got = res["refusals"]
        for name, msg in got.items():
            assert msg is not None and msg.startswith("tensor_parallel over 2 ranks"), name
        assert "MLA" in got["MLA"] and "Mamba-2" in got["Mamba-2"] and "MoE" in got["MoE"]
        assert "n_head (3) is not divisible by tp (2)" in got["n_head (3)"]
        assert "n_kv_head (3) is not divisible by tp (2)" in got["n_kv_head (3)"]
        assert "mlp_dim (67)" in got["mlp_dim (67)"]
        assert "padded_vocab (255)" in got["padded_vocab (255)"]

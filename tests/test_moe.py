"""Tests for moe.py: dispatch against a dense reference that runs every expert on every token,
capacity drops, the balance loss and its statistics (micro-batch, accumulated, across two
processes), the bias update, the router z-loss; and the MoE model in model.py against
transformers' Qwen3-MoE parameter count."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import moe
from model import Model, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

DIM, E, K, D_EXPERT = 16, 6, 2, 24


def dense_reference(layer, x, keep=None):
    """Every expert on every token, then the router's choice as a mask: y_n = sum over the
    token's chosen experts of weight * expert(x_n) (+ shared experts). keep (N, k) bool drops
    assignments."""
    _, _, chosen, weights = layer.gate(x)
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    outs = []
    for e in range(layer.n_experts):
        g, u = (x @ gate_up[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(g) * u) @ down[e].t())
    every = torch.stack(outs, 1)                                      # (N, E, dim)
    picked = every.gather(1, chosen[:, :, None].expand(-1, -1, x.shape[1]))
    w = weights if keep is None else weights * keep
    y = (picked * w[:, :, None]).sum(1)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(x)
    return y


@pytest.mark.parametrize("kw", [dict(), dict(norm_topk=False), dict(score="sigmoid", scale=2.5),
                                dict(n_shared=2), dict(score="sigmoid", norm_topk=False, n_shared=1)],
                         ids=["softmax", "no-renorm", "sigmoid-scaled", "shared", "sigmoid-shared"])
def test_dropless_moe_equals_every_expert_on_every_token(kw):
    layer = moe.MoE(DIM, E, K, D_EXPERT, **kw)
    if layer.gate.e_score_correction_bias is not None:   # a bias that changes the choice, not the weights
        layer.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(3, 11, DIM, requires_grad=True)
    y = layer(x)
    want = dense_reference(layer, x.reshape(-1, DIM)).reshape(3, 11, DIM)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(layer.parameters()), g)
    want_grads = torch.autograd.grad(want, [x] + list(layer.parameters()), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_selection_bias_chooses_but_does_not_weigh():
    router = moe.Router(DIM, E, K, score="sigmoid")
    x = torch.randn(20, DIM)
    router.e_score_correction_bias[3] = 10.0          # expert 3 always chosen
    _, scores, chosen, weights = router(x)
    assert (chosen == 3).any(1).all()
    col = (chosen == 3).float().argmax(1)
    w3 = weights.gather(1, col[:, None]).squeeze(1)
    torch.testing.assert_close(w3, scores[:, 3] / scores.gather(1, chosen).sum(1))   # the raw score, normalised


def test_capacity_drops_exactly_the_overflow_in_token_order():
    layer = moe.MoE(DIM, 4, 1, D_EXPERT, capacity_factor=1.0)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[2, 0] = 5.0                 # every token with x[0] > 0 prefers expert 2
    x = torch.randn(40, DIM)
    x[:, 0] = x[:, 0].abs() + 0.1                     # all of them: expert 2 overflows
    x[30:, 0] = -1.0                                  # except the last ten (spread over 0, 1, 3)
    y = layer(x)
    _, _, chosen, _ = layer.gate(x)
    capacity = math.ceil(1.0 * 40 * 1 / 4)            # 10
    keep = torch.zeros(40, 1, dtype=torch.bool)
    for e in range(4):                                # the first `capacity` tokens of each expert
        keep[(chosen[:, 0] == e).nonzero()[:capacity, 0]] = True
    assert int((~keep).sum()) == 30 - capacity + sum(max(0, int((chosen[30:, 0] == e).sum()) - capacity)
                                                     for e in (0, 1, 3))
    torch.testing.assert_close(y, dense_reference(layer, x, keep), rtol=1e-5, atol=1e-6)
    assert layer.stats["dropped"].item() == pytest.approx(int((~keep).sum()) / 40)
    assert torch.equal(y[~keep[:, 0]], torch.zeros(int((~keep).sum()), DIM))   # dropped: only the residual


def balance_by_hand(scores, chosen, counts_for_f, score="softmax"):
    f = counts_for_f.float() / counts_for_f.sum()
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdim=True)
    return E * (f * probs.mean(0)).sum()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_balance_loss_is_the_switch_formula_and_z_loss_the_st_moe_one(score):
    layer = moe.MoE(DIM, E, K, D_EXPERT, score=score, aux_loss=0.3, z_loss=0.01, global_stats=False)
    x = torch.randn(50, DIM)
    layer(x)
    logits, scores, chosen, _ = layer.gate(x)
    counts = torch.bincount(chosen.flatten(), minlength=E)
    want = 0.3 * balance_by_hand(scores, chosen, counts, score) + 0.01 * logits.logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(layer.loss, want)


def test_even_routing_has_balance_one():
    layer = moe.MoE(DIM, 4, 1, D_EXPERT, aux_loss=1.0)
    with torch.no_grad():
        layer.gate.weight.zero_()                     # uniform probabilities, ties broken to expert 0
    layer(torch.randn(8, DIM))
    # f = (1, 0, 0, 0), P = 1/4 each: E * sum f P = 1, the value at perfect balance too
    assert layer.loss.item() == pytest.approx(1.0)


def test_global_statistics_accumulate_over_micro_batches_until_end_step():
    layer = moe.MoE(DIM, E, K, D_EXPERT, aux_loss=1.0, global_stats=True)
    micro = moe.MoE(DIM, E, K, D_EXPERT, aux_loss=1.0, global_stats=False)
    micro.load_state_dict(layer.state_dict())
    x1, x2 = torch.randn(30, DIM), torch.randn(30, DIM) + 1.0
    # One micro-batch: global and micro-batch statistics are the same thing.
    layer(x1), micro(x1)
    torch.testing.assert_close(layer.loss, micro.loss)
    # A second one before end_step: f covers both, P only the second.
    layer(x2), micro(x2)
    c1 = torch.bincount(layer.gate(x1)[2].flatten(), minlength=E)
    _, scores2, chosen2, _ = layer.gate(x2)
    c2 = torch.bincount(chosen2.flatten(), minlength=E)
    torch.testing.assert_close(layer.loss, balance_by_hand(scores2, chosen2, c1 + c2))
    torch.testing.assert_close(micro.loss, balance_by_hand(scores2, chosen2, c2))
    assert not torch.allclose(layer.loss, micro.loss)
    assert torch.equal(layer.counts, (c1 + c2).float())
    moe.end_step(layer)
    assert layer.counts.sum() == 0
    layer(x2)
    torch.testing.assert_close(layer.loss, micro.loss)   # a fresh step: only x2 again
    # Evaluation and generation do not count.
    with torch.no_grad():
        layer(x1)
    layer.eval()(x1)
    assert torch.equal(layer.counts, c2.float())


def _global_stats_worker(rank, path, state, xs, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        layer = moe.MoE(DIM, E, K, D_EXPERT, aux_loss=1.0, global_stats=True)
        layer.load_state_dict(state)
        layer(xs[rank])
        out[rank] = torch.cat([layer.loss.detach()[None], layer.counts])
    finally:
        dist.destroy_process_group()


def test_global_statistics_are_summed_over_data_parallel_ranks(tmp_path):
    """Two processes (gloo), each with its own half of the batch: both see the counts of the
    whole batch, and each one's loss is f(whole batch) . P(its own half)."""
    torch.manual_seed(0)
    layer = moe.MoE(DIM, E, K, D_EXPERT, aux_loss=1.0, global_stats=True)
    xs = [torch.randn(20, DIM), torch.randn(20, DIM) * 2]
    out = mp.Manager().dict()
    mp.spawn(_global_stats_worker, args=(str(tmp_path / "store"), layer.state_dict(), xs, out), nprocs=2)
    total = sum(torch.bincount(layer.gate(x)[2].flatten(), minlength=E) for x in xs)
    for rank in range(2):
        _, scores, chosen, _ = layer.gate(xs[rank])
        torch.testing.assert_close(out[rank][1:], total.float())
        torch.testing.assert_close(out[rank][0], balance_by_hand(scores, chosen, total))


def test_bias_update_evens_out_a_skewed_router():
    """Every token starts on the same two experts (load 4.0 on each, 0 elsewhere). A sign
    update with a fixed step keeps moving, so the load is judged over the last 50 steps."""
    layer = moe.MoE(DIM, 8, 2, 4, score="sigmoid")
    with torch.no_grad():
        layer.gate.weight[:, 0] = torch.linspace(-2, 2, 8)   # x[0] > 0 favours the last experts
    x = torch.randn(256, DIM)
    x[:, 0] = x[:, 0].abs() + 0.5
    layer(x)
    assert sorted((layer.counts / 256 * 4).tolist())[-2:] == [4.0, 4.0]
    moe.end_step(layer, 0.0)
    recent = torch.zeros(8)
    for step in range(200):
        layer(x)
        if step >= 150:
            recent += layer.counts
        moe.end_step(layer, 0.02)
    load = recent / recent.sum() * 8
    assert load.max() < 1.5 and load.min() > 0.5, load
    assert layer.gate.e_score_correction_bias[-1] < 0 < layer.gate.e_score_correction_bias[0]
    assert all(p.grad is None for p in layer.parameters())   # no gradient was involved


def test_balance_gradient_pushes_probability_away_from_overloaded_experts():
    layer = moe.MoE(DIM, E, K, D_EXPERT, aux_loss=1.0, global_stats=False)
    with torch.no_grad():
        layer.gate.weight[0] += 0.5                   # expert 0 overloaded
    x = torch.randn(200, DIM) + 1.0
    layer(x)
    p_before = layer.gate(x)[1].mean(0)
    layer.loss.backward()
    with torch.no_grad():
        layer.gate.weight -= 0.5 * layer.gate.weight.grad
    p_after = layer.gate(x)[1].mean(0)
    counts = torch.bincount(layer.gate(x)[2].flatten(), minlength=E)
    assert counts.argmax() == 0
    assert p_after[0] < p_before[0]


def test_describe_numbers():
    d = moe.describe(2048, 128, 8, 768)
    assert d["total_params"] == 128 * 3 * 2048 * 768 + 128 * 2048
    assert d["activation_ratio"] == 8 / 128 and d["granularity"] == pytest.approx(2 * 2048 / 768)


# -----------------------------------------------------------------------------
# The MoE model

MOE = dict(vocab_size=256, n_layer=4, dim=32, n_head=4, n_kv_head=2, mlp_dim=64, max_seq_len=64, qk_norm=True,
           tie_embeddings=False, n_experts=8, top_k=2, d_expert=16)


def test_layer_pattern():
    assert ModelConfig(**MOE).ffns == ("moe",) * 4
    assert ModelConfig(**MOE, moe_every=2).ffns == ("dense", "moe", "dense", "moe")       # Qwen's sparse step
    assert ModelConfig(**MOE, first_dense=1, moe_every=1).ffns == ("dense", "moe", "moe", "moe")   # DeepSeek
    for bad, key in [(dict(top_k=9), "top_k"), (dict(router="relu"), "router"), (dict(balance_stats="x"), "balance_stats"),
                     (dict(n_experts=0, ffns=("moe",) * 4), "n_experts"), (dict(ffns=("dense", "ssm") * 2), "ffns"),
                     (dict(moe_every=0), "moe_every"), (dict(bias_update_rate=0.01), "bias_update_rate"),
                     (dict(n_group=3), "n_group"), (dict(n_group=4, topk_group=5), "n_group"),
                     (dict(n_group=8, topk_group=1), "topk_group")]:
        with pytest.raises(ValueError, match=f"ModelConfig.{key}"):
            ModelConfig(**{**MOE, **bad})


def test_parameter_count_equals_transformers_qwen3_moe():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[],
                                     tie_word_embeddings=False)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.Qwen3MoeForCausalLM(hf).parameters())
    m = Model(ModelConfig(**MOE, moe_every=2, vocab_multiple=1))
    assert m.num_params()[0] == theirs
    # active: the dense layers, attention, embeddings, routers, and 2 of 8 experts per MoE layer
    bank = 8 * 3 * 32 * 16
    assert m.num_active_params() == theirs - 2 * bank * 6 // 8


def test_shared_banks_count_once_and_save_once():
    m = Model(ModelConfig(**MOE, moe_share=2))
    layers = m.moe_layers
    assert layers[0].experts is layers[1].experts and layers[2].experts is layers[3].experts
    assert layers[1].experts is not layers[2].experts and layers[0].gate is not layers[1].gate
    bank = 8 * 3 * 32 * 16
    unshared = Model(ModelConfig(**MOE))
    assert unshared.num_params()[0] - m.num_params()[0] == 2 * bank
    assert m.num_active_params() == unshared.num_active_params()         # each layer still runs its 2 experts
    assert m.flops_per_token(16) == unshared.flops_per_token(16)
    w = m.weights()
    assert "layers.0.mlp.experts.gate_up_proj" in w and "layers.1.mlp.experts.gate_up_proj" not in w
    m2 = Model(ModelConfig(**MOE, moe_share=2))
    m2.load_state_dict(w, strict=False)
    x = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(m2(x)[0], m(x)[0])


def test_moe_model_loss_holds_the_balance_terms_and_learns():
    torch.manual_seed(0)
    m = Model(ModelConfig(**MOE, moe_aux_loss=0.01, router_z_loss=0.001, router="sigmoid", n_shared_experts=1))
    x = torch.randint(0, 64, (4, 17))
    _, loss, aux = m(x[:, :-1], labels=x[:, 1:])
    torch.testing.assert_close(loss, aux["ce"] + aux["moe_loss"])
    assert aux["moe_loss"] == sum(layer.loss.detach() for layer in m.moe_layers)
    assert sorted(aux["moe"]) == [0, 1, 2, 3] and set(aux["moe"][0]) == {"min_load", "max_load", "load_entropy", "dropped"}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(30):
        _, loss, _ = m(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.end_step(m, 0.01)
    assert loss.item() < first - 1.0
    assert m.moe_layers[0].gate.e_score_correction_bias.abs().sum() > 0   # the bias moved


def test_generation_with_moe_layers():
    m = Model(ModelConfig(**MOE)).eval()
    out = m.generate([[1, 2, 3], [4]], max_new_tokens=5, temperature=0)
    seq = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            seq.append(m(torch.tensor([seq]))[0][0, -1, :256].argmax().item())
    assert out[0] == seq[3:]
    assert m.moe_layers[0].counts.sum() == 0


def test_demo(capsys):
    moe._demo(steps=40)
    out = capsys.readouterr().out
    assert "Qwen3-30B-A3B" in out and "bias (DeepSeek-V3)" in out and "load per expert" in out


# -----------------------------------------------------------------------------
# The grouped GEMM: the Triton kernels (forward, dx, dw) against the per-expert loop, on the GPU
# when there is one, else on the CPU under Triton's interpreter.

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gemm(kernels, monkeypatch):
    """The grouped GEMM kernels on, 16-wide tiles so small shapes make many tiles and tails,
    and every buffer poisoned with NaN."""
    if kernels.device.type == "cpu":
        monkeypatch.setattr(moe, "kernels_on", lambda t: True)
    kernels.small_tiles()
    kernels.poison()


def offsets_of(counts):
    return torch.tensor([0] + list(counts), dtype=torch.int64).cumsum(0)


def run_both(counts, M, K, dtype=torch.float32, x=None, w=None):
    """grouped_mm (the kernels) and grouped_mm_reference on the same inputs and the same random
    upstream gradient; returns (y, dx, dw) of each, on the CPU in float32."""
    N, E = sum(counts), len(counts)
    x = torch.randn(N, K) if x is None else x
    w = torch.randn(E, M, K) / K ** 0.5 if w is None else w
    dy = torch.randn(N, M)
    results = []
    for fn in (moe.grouped_mm, moe.grouped_mm_reference):
        # copies with the inputs' own strides (also on the GPU), so strided inputs stay strided
        xi = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=DEVICE).copy_(x).requires_grad_()
        wi = torch.empty_strided(w.shape, w.stride(), dtype=dtype, device=DEVICE).copy_(w).requires_grad_()
        y = fn(xi, wi, offsets_of(counts).to(DEVICE))
        y.backward(dy.to(DEVICE, dtype))
        results.append([t.detach().float().cpu() for t in (y, xi.grad, wi.grad)])
    return results


def assert_match(counts, M, K, dtype=torch.float32, **kw):
    got, want = run_both(counts, M, K, dtype, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    dw = got[2]
    for e, c in enumerate(counts):
        if c == 0:   # written by the kernel, not left as the poison (and not merely close to 0)
            assert torch.equal(dw[e], torch.zeros_like(dw[e])), f"expert {e} has no rows: dw must be 0"


CASES = {
    # uneven: an empty expert, counts not multiples of the 16-row tile (5, 21, 3) and one that is (16);
    # M and K not multiples of 16 either
    "uneven": ([5, 0, 16, 21, 3], 24, 40),
    "one-expert": ([37], 20, 18),
    "eight-experts-N50": ([7, 0, 12, 1, 9, 0, 17, 4], 17, 33),
    "no-tokens": ([0, 0, 0], 16, 16),
}


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference_fp32(gemm, case):
    assert_match(*CASES[case])


@pytest.mark.parametrize("case", ["uneven", "eight-experts-N50"])
def test_kernels_match_reference_fp16(gemm, case):
    assert_match(*CASES[case], dtype=torch.float16)


def test_strided_inputs(gemm):
    # The kernels read x and w through their strides: a column-sliced x and a w whose storage
    # is (E, K, M) (transposed) give the same answers with no copies.
    counts, M, K = [9, 0, 20], 18, 24
    x = torch.randn(sum(counts), 2 * K)[:, ::2]
    w = torch.randn(len(counts), K, M).transpose(1, 2)
    assert x.stride() == (2 * K, 2) and w.stride() == (K * M, 1, M)
    assert_match(counts, M, K, x=x, w=w)


@pytest.mark.parametrize("counts", [[0, 0, 40, 0], [1] * 8], ids=["all-in-one-expert", "one-per-expert"])
def test_grid_bound_is_enough(gemm, counts):
    # The grid launches cdiv(N, BLOCK_M) + E row tiles; the real ones are sum_e ceil(c_e / BLOCK_M).
    # The two extremes: every token in one expert (the tiles pack full), and one token per expert
    # (a tile per token: cdiv(N, BLOCK_M) alone, 1 here, would drop 7 experts).
    N, E = sum(counts), len(counts)
    offsets = offsets_of(counts)
    expert, row = moe._tile_schedule(offsets, N, 16)
    real = sum(-(-c // 16) for c in counts)
    assert expert.shape[0] == -(-N // 16) + E >= real
    if counts == [1] * 8:
        assert real > -(-N // 16)
    assert (expert[real:] == E).all() and (expert[:real] < E).all()
    # The real tiles cover every row exactly once, each within one expert.
    covered = []
    for e, r in zip(expert[:real].tolist(), row[:real].tolist()):
        end = offsets[e + 1].item()
        assert offsets[e] <= r < end
        covered += range(r, min(r + 16, end))
    assert covered == list(range(N))
    assert_match(counts, 20, 24)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["tall", "wide"])
def test_unequal_tiles(gemm, kernels, tiles):
    # Tuned settings may make the row, column and depth tiles all different.
    kernels.small_tiles(*tiles)
    assert_match([40, 0, 3, 17, 33], 50, 40)


def test_schedule_bound_random_counts():
    # The bound over many random routings, skewed ones included: never more real tiles than the
    # grid has, and each expert's tiles start at its first row, BLOCK_M apart.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        E = int(torch.randint(1, 20, (1,), generator=g))
        counts = (torch.rand(E, generator=g) ** 4 * 100).long()
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        expert, row = moe._tile_schedule(offsets, int(counts.sum()), 16)
        tiles = (counts + 15) // 16
        assert int(tiles.sum()) <= expert.shape[0]
        want_expert = torch.repeat_interleave(torch.arange(E), tiles)
        want_row = torch.cat([offsets[e] + 16 * torch.arange(int(tiles[e])) for e in range(E)])
        real = want_expert.shape[0]
        assert torch.equal(expert[:real], want_expert) and torch.equal(row[:real], want_row)
        assert (expert[real:] == E).all()


def test_autocast_runs_in_the_autocast_dtype(gemm):
    # As nn.Linear under autocast: float32 inputs are multiplied in the autocast dtype (float16
    # here: the interpreter's bf16 dot is wrong) and the gradients come back in float32.
    counts, M, K = [6, 0, 19], 20, 17
    x, w = torch.randn(sum(counts), K, device=DEVICE), torch.randn(3, M, K, device=DEVICE) / K ** 0.5
    out = []
    for fn in (moe.grouped_mm, moe.grouped_mm_reference):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            y = fn(xi, wi, offsets_of(counts).to(DEVICE))   # the reference's @ autocasts by itself
        y.float().sum().backward()
        out.append((y, xi.grad, wi.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = out
    assert y.dtype == torch.float16 and dx.dtype == dw.dtype == torch.float32
    for g, r in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(g.float(), r.float(), rtol=1e-2, atol=1e-2)


def test_forward_only_and_partial_grads(gemm):
    # Under no_grad no backward state matters; with only w needing a gradient, dx is not computed.
    counts, M, K = [3, 17], 16, 20
    x, w, off = torch.randn(20, K, device=DEVICE), torch.randn(2, M, K, device=DEVICE), offsets_of(counts).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(moe.grouped_mm(x, w, off), moe.grouped_mm_reference(x, w, off), rtol=1e-5, atol=1e-5)
    wk, wr = w.clone().requires_grad_(), w.clone().requires_grad_()
    moe.grouped_mm(x, wk, off).sum().backward()
    moe.grouped_mm_reference(x, wr, off).sum().backward()
    torch.testing.assert_close(wk.grad, wr.grad, rtol=1e-5, atol=1e-5)


def test_reference_runs_without_the_kernel(monkeypatch):
    # On CPU tensors (no patch), grouped_mm is the reference; GroupedMM is never reached.
    assert moe.kernels_on(SimpleNamespace(is_cuda=False)) is False
    assert moe.kernels_on(SimpleNamespace(is_cuda=True)) is (moe.triton is not None)
    monkeypatch.setattr(moe.GroupedMM, "apply", lambda *a: pytest.fail("the kernel path ran on the CPU"))
    x, w = torch.randn(7, 5), torch.randn(2, 3, 5)
    y = moe.grouped_mm(x, w, offsets_of([4, 3]))
    torch.testing.assert_close(y, torch.cat([x[:4] @ w[0].T, x[4:] @ w[1].T]))


@pytest.mark.parametrize("x_shape, w_shape, offsets, match", [
    ((4, 8, 1), (2, 3, 8), [0, 2, 4], r"x must be 2-D .* \(4, 8, 1\)"),
    ((4, 8), (3, 8), [0, 2, 4], r"w must be 3-D .* \(3, 8\)"),
    ((4, 8), (2, 3, 7), [0, 2, 4], r"w \(2, 3, 7\) takes 7 input features per expert, x \(4, 8\) has 8"),
    ((4, 8), (2, 3, 8), [0, 4], r"E \+ 1 = 3 entries for w \(2, 3, 8\), got shape \(2,\)"),
    ((4, 8), (0, 3, 8), [0], r"w \(0, 3, 8\) holds no experts"),
    ((4, 8), (2, 3, 8), [0.0, 2.0, 4.0], r"offsets must be integers"),
    ((4, 8), (2, 3, 8), [0, 3, 2], r"offsets must rise from 0 to N = 4"),
    ((4, 8), (2, 3, 8), [0, 2, 5], r"offsets must rise from 0 to N = 4"),
])
def test_validation_errors(x_shape, w_shape, offsets, match):
    with pytest.raises(ValueError, match=match):
        moe.grouped_mm(torch.randn(x_shape), torch.randn(w_shape), torch.tensor(offsets))


def test_validation_errors_dtype():
    with pytest.raises(ValueError, match=r"x \(torch.float32\) and w \(torch.float16\) must share a dtype"):
        moe.grouped_mm(torch.randn(4, 8), torch.randn(2, 3, 8).half(), torch.tensor([0, 2, 4]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync only exists with a GPU")
def test_no_host_sync():
    # The point of the design: forward and backward never wait for the device, so the router's
    # counts never stall the CPU. torch raises on any synchronizing call in this mode.
    counts, M, K = [100, 0, 37, 300], 256, 128
    x = torch.randn(sum(counts), K, device="cuda", requires_grad=True)
    w = torch.randn(4, M, K, device="cuda", requires_grad=True)
    off = offsets_of(counts).cuda()
    dy = torch.ones(sum(counts), M, device="cuda")
    moe.grouped_mm(x, w, off).backward(dy)    # compiles the kernels first (for these same strides)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.grouped_mm(x, w, off).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("capacity", [None, 0.75])
def test_moe_layer_on_the_grouped_gemm_equals_every_expert_on_every_token(gemm, capacity):
    """The whole layer with the kernels on: dropless, and with capacity (some experts full)."""
    layer = moe.MoE(DIM, E, K, D_EXPERT, n_shared=1, capacity_factor=capacity)
    x = torch.randn(37, DIM)
    ref_in = x.clone().requires_grad_()
    keep = None
    if capacity is not None:   # the same drops, computed on the CPU: first `cap` of each expert in token order
        chosen = layer.gate(x)[2]
        cap = math.ceil(capacity * 37 * K / E)
        flat = chosen.flatten()
        rank = torch.zeros_like(flat)
        for e in range(E):
            idx = (flat == e).nonzero()[:, 0]
            rank[idx] = torch.arange(len(idx))
        keep = (rank < cap).view(37, K)
        assert not keep.all()
    want = dense_reference(layer, ref_in, keep)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [ref_in] + list(layer.parameters()), g)
    dev_layer = layer.to(DEVICE)
    xd = x.to(DEVICE).requires_grad_()
    y = dev_layer(xd)
    grads = torch.autograd.grad(y, [xd] + list(dev_layer.parameters()), g.to(DEVICE))
    torch.testing.assert_close(y.cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_group_limited_routing_equals_a_per_token_loop():
    # DeepSeek-V3's rule, one token at a time: rank the groups by the sum of their two best
    # biased scores, keep topk_group of them, take the top_k experts inside those groups.
    torch.manual_seed(0)
    E, G, keep, k = 12, 4, 2, 3
    router = moe.Router(16, E, k, score="sigmoid", n_group=G, topk_group=keep)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.1 * torch.randn(E))
    x = torch.randn(50, 16)
    _, scores, chosen, weights = router(x)
    biased = scores + router.e_score_correction_bias
    for n in range(x.shape[0]):
        groups = biased[n].view(G, E // G)
        best = sorted(range(G), key=lambda g: -groups[g].topk(2).values.sum().item())[:keep]
        allowed = [e for g in best for e in range(g * E // G, (g + 1) * E // G)]
        want = sorted(allowed, key=lambda e: -biased[n, e].item())[:k]
        assert sorted(chosen[n].tolist()) == sorted(want)
        w = scores[n, chosen[n]]
        torch.testing.assert_close(weights[n], w / w.sum())
    with pytest.raises(ValueError, match="n_group=5"):
        moe.Router(16, E, k, n_group=5)
    with pytest.raises(ValueError, match="topk_group=1"):
        moe.Router(16, E, 4, n_group=4, topk_group=1)   # 4 experts do not fit in one group of 3

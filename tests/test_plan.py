"""Tests for `python train.py --plan` and parallel.memory_plan: the bytes per GPU against a hand
count from the shapes and against the bytes a real AdamW step allocates, the parameter count of
SmolLM2-135M against Hugging Face's, the printed plan (built on the meta device, in seconds) with a
layout that does not fit, and the command line's errors."""

import os
import re
import time

import pytest
import torch

import model as M
import parallel
import train

# a small GQA model: 4 query heads share 2 K/V heads; the embedding tied to the head
SMALL = dict(vocab_size=256, vocab_multiple=128, n_layer=2, dim=32, n_head=4, n_kv_head=2, mlp_dim=64,
             max_seq_len=64)


def small_model(device="cpu", **kw):
    with torch.device(device):
        return M.Model(M.ModelConfig(**{**SMALL, **kw}))


def shape_counts(V=256, h=32, L=2, a=4, kv=2, f=64):
    """Parameter counts from the shapes, written out: (total, per block, root)."""
    d = h // a
    block = (h * a * d + 2 * h * kv * d + a * d * h    # q, k and v, o
             + 3 * h * f                             # gate, up, down
             + 2 * h)                                # the two RMSNorms
    root = V * h + h                                 # the (tied) embedding and the final norm
    return L * block + root, block, root


# -----------------------------------------------------------------------------
# memory_plan against a hand count

def test_weights_grads_optimizer_by_hand():
    m = small_model("meta")
    P, block, root = shape_counts()
    assert m.num_params()[0] == P
    steps = 4 * len(list(m.parameters()))     # AdamW's step counter: one float32 per tensor
    one = parallel.memory_plan(m, 16, 2)
    # one GPU: fp32 weights 4 B, fp32 gradients 4 B, AdamW's two fp32 moments 8 B per parameter
    assert (one["weights"], one["grads"], one["optimizer"]) == (4 * P, 4 * P, 8 * P + steps)
    assert one["total"] == one["weights"] + one["grads"] + one["optimizer"] + one["activations"]
    # plain DP: DataParallel's flat buckets are a second copy of the gradients
    ddp = parallel.memory_plan(m, 16, 2, dp=4)
    assert (ddp["weights"], ddp["grads"], ddp["optimizer"]) == (4 * P, 8 * P, 8 * P + steps)
    assert ddp["activations"] == one["activations"]           # each rank runs its own micro-batch
    # ZeRO over 4 ranks: stage 1 a quarter of the optimizer state, 2 of the gradients too (plus the
    # root's and one block's full gradients, alive until reduced), 3 of the weights too (plus the
    # root and one block gathered)
    z1, z2, z3 = (parallel.memory_plan(m, 16, 2, dp=4, zero_stage=s) for s in (1, 2, 3))
    assert (z1["weights"], z1["grads"], z1["optimizer"]) == (4 * P, 4 * P, 8 * P / 4 + steps)
    assert (z2["weights"], z2["grads"], z2["optimizer"]) == (4 * P, 4 * P / 4 + 4 * (root + block), 8 * P / 4 + steps)
    assert (z3["weights"], z3["grads"], z3["optimizer"]) == (4 * P / 4 + 4 * (root + block),) * 2 + (8 * P / 4 + steps,)
    assert z3["total"] < z2["total"] < z1["total"] < ddp["total"]


def test_tensor_and_pipeline_splits_by_hand():
    m = small_model("meta")
    P, block, root = shape_counts()
    h, V = 32, 256
    # tp 4 over 2 K/V heads: q, o, gate, up, down, the embedding (= head) split 4 ways; k and v
    # over 2 slots (each K/V head held by two ranks); the norms whole on every rank
    per_block = (2 * h * h + 3 * h * 64) / 4 + 2 * h * 16 / 2 + 2 * h
    tp = parallel.memory_plan(m, 16, 2, tp=4)
    assert tp["weights"] == 4 * (2 * per_block + V * h / 4 + h)
    # pp 2: stage 0 the embedding and layer 0; stage 1 layer 1, the final norm and a copy of the
    # tied matrix as its head, plus the loss: the last stage is the fuller one
    pp = parallel.memory_plan(m, 16, 2, pp=2, dp=2, n_micro=4)
    assert pp["weights"] == 4 * (block + h + V * h)
    assert pp["grads"] == 2 * pp["weights"]                    # DataParallel's buckets
    with pytest.raises(ValueError, match="n_head"):
        parallel.memory_plan(m, 16, 2, tp=3)
    with pytest.raises(ValueError, match="pipeline"):
        parallel.memory_plan(m, 16, 2, pp=2, dp=2, zero_stage=3)
    with pytest.raises(ValueError, match="zero_stage"):
        parallel.memory_plan(m, 16, 2, zero_stage=1)


def test_activations_by_hand():
    """The per-token terms the comment lists, written out once more for one layout."""
    m = small_model("meta")
    h, a, kv, d, f, L, V = 32, 4, 2, 8, 64, 2, 256
    B, T = 3, 16
    matmul = L * (2 * h * a * d + 2 * h * kv * d + 3 * h * f) + V * h     # the head reads the embedding
    per_layer = (4 * h + 4 * h          # the two float32 residual inputs of the norms
                 + 5 * 2 * h            # bf16 casts of the normed input: q, k, v; gate, up
                 + 2 * (a * d + kv * d + kv * d + a * d) + 4 * a   # flash: q, k, v, out; logsumexp
                 + 4 * 2 * f)           # SwiGLU: gate, silu(gate), up, product
    head = 8 * h * B * T + 4 * V * h + 2 * min(B * T, 2 ** 25 // V) * V
    assert parallel.memory_plan(m, T, B)["activations"] == B * T * L * per_layer + 2 * matmul + head
    # 1F1B: the first stage keeps min(pp, micro-batches) in flight, each of its L/pp layers; at
    # long enough micro-batches that stage, not the head's, is the fullest
    few, full = (parallel.memory_plan(m, 64, 8, pp=2, n_micro=n) for n in (1, 8))
    one_layer, layer_matmul = 8 * 64 * per_layer, (matmul - V * h) // L
    head = 8 * h * 8 * 64 + 4 * V * h + 2 * 8 * 64 * V
    assert few["activations"] == one_layer + 2 * (layer_matmul + V * h) + head         # the last stage
    assert full["activations"] == 2 * one_layer + 2 * layer_matmul                      # the first: no head


# -----------------------------------------------------------------------------
# memory_plan against the bytes a real step allocates (CPU, float32: what those three columns count)

def test_weights_grads_optimizer_match_a_real_adamw_step():
    torch.manual_seed(0)
    m = small_model()
    opt = torch.optim.AdamW(train.param_groups(m, 0.1), lr=1e-3)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 17))
    _, loss, _ = m(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    opt.step()
    params = list(m.parameters())                            # each tensor once (the tied head is the embedding)
    got = {"weights": sum(p.nbytes for p in params), "grads": sum(p.grad.nbytes for p in params),
           "optimizer": sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}
    plan = parallel.memory_plan(m, 16, 2)
    assert {k: plan[k] for k in got} == got
    assert {k: parallel.memory_plan(small_model("meta"), 16, 2)[k] for k in got} == got   # shapes alone


def test_checkpoint_size_is_12_bytes_per_parameter(tmp_path):
    """What the plan prints as the checkpoint (fp32 weights + AdamW's moments and step counters)
    against save_checkpoint's files: equal but for safetensors' JSON headers."""
    torch.manual_seed(0)
    m = small_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.zeros(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    train.save_checkpoint(str(tmp_path / "step"), m, opt, {"step": 1})
    P, n = m.num_params()[0], len(list(m.parameters()))
    size = sum(os.path.getsize(tmp_path / "step" / f) for f in ("model.safetensors", "optimizer.safetensors"))
    assert 12 * P + 4 * n <= size < 12 * P + 4 * n + 16 * 1024


# -----------------------------------------------------------------------------
# The printed plan

def run_plan(capsys, *argv):
    train.main(["--plan", *argv])
    return capsys.readouterr().out


def rows(out):
    """{(dp, tp, pp, sharding): (columns..., fits)} of the memory table."""
    table = {}
    for line in out.splitlines():
        m = re.match(r"\| (\d+) x (\d+) x (\d+) \| (\S+) \| (\S+) \| (.*) \| (yes|NO) \|$", line)
        if m:
            table[tuple(map(int, m.group(1, 2, 3))) + (m.group(4),)] = (
                [float(x) for x in m.group(6).split(" | ")], m.group(7))
    return table


def test_smollm2_135m_parameters_match_hugging_face(capsys):
    with torch.device("meta"):
        m = M.Model(M.preset("smollm2-135m"))
    assert m.num_params()[0] == 134_515_008                  # HuggingFaceTB/SmolLM2-135M, tied embeddings
    out = run_plan(capsys, "--preset", "smollm2-135m", "--tokens", "2T", "--gpus", "8", "--gpu", "h100")
    assert f"{m.num_params()[0]:,} parameters ({m.num_params()[1]:,} non-embedding)" in out
    assert "134,515,008 parameters" in out


def test_plan_prints_fast_from_the_meta_device(capsys, monkeypatch):
    built = []
    real = M.Model

    def spy(config):
        model = real(config)
        built.append(next(model.parameters()).device.type)
        return model
    monkeypatch.setattr(M, "Model", spy)
    t0 = time.perf_counter()
    out = run_plan(capsys, "--preset", "smollm2-135m", "--tokens", "2T", "--gpus", "8", "--gpu", "h100",
                   "--seq_len", "2048", "--batch_size", "4", "--total_batch_tokens", "1048576")
    assert time.perf_counter() - t0 < 5
    assert built == ["meta"]                                  # no real weight was allocated
    table = rows(out)
    # 135M's 9 heads split over no tp in 2, 4, 8: those layouts are skipped, with the reason
    assert {k[1] for k in table} == {1} and "skipped: tp 2: n_head (9) is not divisible" in out
    assert set(table) >= {(8, 1, 1, "DDP"), (8, 1, 1, "ZeRO-1"), (8, 1, 1, "ZeRO-3"), (4, 1, 2, "DDP"),
                          (1, 1, 8, "-")}
    assert all(fits == "yes" for _, fits in table.values())
    # accum: 2^20 tokens / (4 x 2048 x 8 ranks) = 16 micro-batches per step
    assert re.search(r"\| 8 x 1 x 1 \| DDP \| 16 \|", out)
    assert "pick: dp 8 x tp 1 x pp 1 " in out
    # the wall time: tokens x FLOPs per token / (GPUs x peak x MFU)
    with torch.device("meta"):
        fpt = real(M.preset("smollm2-135m")).flops_per_token(2048)
    hours = 2e12 * fpt / (8 * 989e12 * 0.20) / 3600
    assert f"{hours:,.1f} hours" in out and "20% MFU (measured: smollm2-135m on one H100" in out
    # the checkpoint: 12 bytes per parameter and 4 per tensor, in GiB
    n_tensors = 3 + 9 * 30                                   # embedding, final norm; 9 per block
    assert f"checkpoint: {(12 * 134_515_008 + 4 * n_tensors) / 2 ** 30:,.2f} GiB per save" in out


def test_a_layout_that_cannot_fit_says_so(capsys):
    # 3B parameters x 16 bytes = 46 GiB of weights, gradients and AdamW on one 24 GiB card
    out = run_plan(capsys, "--preset", "smollm3-3b", "--tokens", "11T", "--gpus", "1", "--gpu", "l4")
    table = rows(out)
    assert list(table) == [(1, 1, 1, "-")]
    (weights, grads, optimizer, act, total), fits = table[(1, 1, 1, "-")]
    assert fits == "NO" and total > 24 and weights == pytest.approx(3_075_098_624 * 4 / 2 ** 30, abs=0.01)
    assert "pick: nothing fits" in out
    # on 8 H100s ZeRO-3 fits where plain DDP does not (the default micro-batch, 8 x 256)
    table = rows(run_plan(capsys, "--preset", "smollm3-3b", "--tokens", "11T", "--gpus", "8", "--tp", "1"))
    assert table[(8, 1, 1, "ZeRO-3")][1] == "yes" and table[(8, 1, 1, "DDP")][1] == "NO"
    assert set(k[1] for k in table) == {1}                    # --tp pins the tensor-parallel degree


@pytest.mark.parametrize("argv, message", [
    ([], "--plan needs --tokens"),
    (["--tokens", "lots"], "--tokens 'lots'"),
    (["--tokens", "0"], "--tokens '0'"),
    (["--tokens", "-2B"], "--tokens '-2B'"),
    (["--tokens", "2X"], "--tokens '2X'"),
    (["--tokens"], "--tokens needs a value"),
    (["--tokens", "2B", "--gpus", "0"], "--gpus '0'"),
    (["--tokens", "2B", "--gpus", "two"], "--gpus 'two'"),
    (["--tokens", "2B", "--gpu", "tpu"], "--gpu 'tpu': known GPUs are h100"),
    (["--tokens", "2B", "--mfu", "1.5"], "--mfu '1.5'"),
    (["--tokens", "2B", "--gpus", "6", "--tp", "4"], "--gpus 6 is not divisible by --tp 4 x --pp 1"),
    (["--tokens", "2B", "--preset", "gpt5"], "--preset 'gpt5'"),
    (["--tokens", "2B", "--seq_len", "4096"], "--seq_len 4096 exceeds"),
    (["--tokens", "2B", "--nonsense", "1"], "unknown key 'nonsense'"),
])
def test_bad_input_names_the_flag(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(["--plan", *argv])


@pytest.mark.parametrize("text, tokens", [("2e9", 2e9), ("500M", 5e8), ("2B", 2e9), ("11T", 1.1e13),
                                          ("1_000_000", 1e6), ("3k", 3e3)])
def test_token_counts(capsys, text, tokens):
    out = run_plan(capsys, "--tokens", text)                 # the tiny preset
    with torch.device("meta"):
        m = M.Model(M.preset("tiny"))
    assert f"{tokens * m.flops_per_token(256):.3g} FLOPs" in out

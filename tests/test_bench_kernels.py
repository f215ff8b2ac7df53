"""bench.py kernels and bench.py train --kernels, on the CPU.

The kernel table is a CUDA measurement, but its code is not: every row function runs here on
CPU tensors in float32 at tiny shapes, with the Triton kernels switched on for CPU tensors
(conftest.py sets TRITON_INTERPRET=1), so a broken benchmark shows up before a GPU is lent.
"""

import math
import os

import pytest
import torch

import attention
from conftest import Kernels
import bench
import model

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

pytest.importorskip("triton")   # without it (macOS) the kernels do not exist; the references run

# Every shape small enough for Triton's interpreter, and the tiles smaller than T = 40, so
# that the flash kernels walk several tiles, a partial one and (with documents) skip some.
SHAPES = dict(batch_size=1, heads=2, kv_heads=1, seq_len=40, head_dim=16, doc_min=4, doc_max=16,
              norm_rows=50, norm_dim=48, vocab_size=300, dim=32, tokens=64)


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels on for CPU tensors, small tiles, and a count of kernel launches."""
    if os.environ.get("TRITON_INTERPRET") != "1":   # conftest sets it only where there is no CUDA
        pytest.skip("Triton runs kernels on CPU tensors only under TRITON_INTERPRET=1; on a GPU, run bench.py kernels")
    monkeypatch.setattr(attention, "kernels_on", lambda t: True)
    monkeypatch.setattr(model, "kernels_on", lambda t: True)
    Kernels(monkeypatch).small_tiles()
    calls = {"flash": 0, "rms_norm": 0, "cross_entropy": 0}

    def counted(key, f):
        def wrapper(*a, **k):
            calls[key] += 1
            return f(*a, **k)
        return wrapper

    monkeypatch.setattr(attention.FlashAttention, "apply", counted("flash", attention.FlashAttention.apply))
    monkeypatch.setattr(model.RMSNormFunction, "apply", counted("rms_norm", model.RMSNormFunction.apply))
    monkeypatch.setattr(model, "cross_entropy_rows", counted("cross_entropy", model.cross_entropy_rows))
    return calls


def test_every_kernel_row_runs_the_kernel_and_agrees_with_eager(kernels, capsys):
    rows = bench.kernel_rows(torch.device("cpu"), torch.float32, SHAPES, rounds=1, backend=None)
    # Ours, sdpa and eager for the three attention cases; ours and eager for the other two.
    first_word = [r["impl"].split(":")[0].split(",")[0] for r in rows]
    assert first_word == ["ours", "sdpa", "eager"] * 3 + ["ours", "eager"] * 2
    assert [r["ours"] for r in rows] == [True, False, False] * 3 + [True, False] * 2
    for r in rows:
        assert "error" not in r, r
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0 and r["rate"] > 0, r
        assert r["peak"] is None     # no memory counter on the CPU
        # float32 everywhere: every implementation computes the same output and gradients
        assert r["diff"] < 1e-5, r
    # Each "ours" row ran its kernel: the warm-up and one timed round (peak memory: CPU, none).
    assert kernels == {"flash": 3 * 2, "rms_norm": 2, "cross_entropy": 2}
    docs = rows[3]["kernel"]
    assert "documents" in docs and "mean length" in docs

    bench.print_kernel_table(rows)
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 9 for line in table)
    assert "| 1.00x | n/a (CPU) |" in table[2]


def test_documents_row_counts_only_the_needed_work(kernels):
    """The documents row credits every implementation with the causal half of each document's
    own block, which is less than the causal half of the whole row."""
    s = dict(SHAPES, seq_len=32, doc_min=8, doc_max=8)      # four documents of 8
    rows = bench.attention_rows("cpu", torch.float32, s, rounds=1, backend=None, case="documents")
    flops = rows[0]["rate"] * rows[0]["seconds"]
    assert flops == pytest.approx(3.5 * 4 * 2 * 16 * 4 * 8 * 8 / 2)
    assert "4 docs of mean length 8" in rows[0]["kernel"]


def test_a_failing_baseline_is_a_row_that_says_why(capsys):
    def ours():
        x = torch.ones(3, requires_grad=True)
        return (x * 2, *torch.autograd.grad((x * 2).sum(), x))

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB\nmore text")

    rows = bench.measure("k", [("ours", ours), ("eager", ours), ("big", oom)], "cpu", 2, 1e9, "GB/s")
    assert "error" not in rows[0] and rows[0]["diff"] == 0
    assert rows[2]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 64 GiB"
    bench.print_kernel_table(rows)
    out = capsys.readouterr().out
    assert "| k | big | n/a (OutOfMemoryError: CUDA out of memory. Tried to allocate 64 GiB) |" in out


def test_compiled_baselines_trace(kernels):
    """The torch.compile rows, with dynamo's "eager" backend: it traces as inductor would but
    generates no code, which on a CPU would take minutes."""
    s = dict(SHAPES, norm_rows=8, tokens=16)
    rows = bench.attention_rows("cpu", torch.float32, s, 1, backend="eager", case="documents")
    rows += bench.rms_norm_rows("cpu", torch.float32, s, 1, backend="eager")
    rows += bench.ce_rows("cpu", torch.float32, s, 1, backend="eager")
    assert [r["impl"] for r in rows if "compile" in r["impl"]] == ["torch.compile(eager)"] * 3
    assert all("error" not in r and r["diff"] < 1e-5 for r in rows), rows


def test_kernels_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["bench.py", "kernels"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_kernels_off_switches_every_file_and_restores_them(monkeypatch):
    import moe
    import ssm
    on = lambda t: True  # noqa: E731
    files = (attention, model, moe, ssm)
    for f in files:
        monkeypatch.setattr(f, "kernels_on", on)
    x = torch.zeros(1)
    with bench.kernels_off():
        assert not any(f.kernels_on(x) for f in files)
    assert all(f.kernels_on is on for f in files)
    with pytest.raises(ValueError), bench.kernels_off():
        raise ValueError
    assert all(f.kernels_on is on for f in files)


def test_train_measures_kernels_on_and_off_side_by_side(kernels, monkeypatch, capsys):
    """With the kernels on for CPU tensors, `bench.py train` measures twice: the "on" step runs
    every kernel, the "off" step none of them."""
    monkeypatch.setattr("sys.argv", ["bench.py", "train", "--batch-size", "1", "--seq-len", "32",
                                     "--steps", "1", "--warmup", "0"])
    bench.main()
    out = capsys.readouterr().out
    assert "| tiny | on | 1 x 32 |" in out and "| tiny | off | 1 x 32 |" in out
    assert "tiny: MFU kernels on / off = " in out
    n_layer = model.PRESETS["tiny"]["n_layer"]
    assert kernels == {"flash": n_layer, "rms_norm": 2 * n_layer + 1, "cross_entropy": 1}
    assert attention.kernels_on(torch.zeros(1)) and model.kernels_on(torch.zeros(1))   # switched back on


def test_ssm_rows_run_the_triton_scan_and_agree_with_pytorch(kernels, monkeypatch, capsys):
    """bench.py ssm at tiny shapes: the Triton scan's row (kernels on for CPU tensors), the chunked
    PyTorch scan and the sequential recurrence agree; decoding rows report a fixed Mamba-2 cache
    and a KV cache that grows with the context."""
    import ssm
    monkeypatch.setattr(ssm, "kernels_on", lambda t: True)
    s = dict(batch=1, heads=2, head_dim=16, state=16, groups=1, chunk=16, dim=32)
    rows = bench.ssm_scan_rows(torch.device("cpu"), 40, s, rounds=1)
    assert [r["impl"] for r in rows] == ["ours: Triton scan", "chunked PyTorch", "sequential recurrence"]
    assert all("error" not in r and r["diff"] < 1e-5 for r in rows)
    decode = bench.ssm_decode_rows(torch.device("cpu"), [16, 64], s, rounds=1, steps=2)
    assert decode[0][3] == decode[1][3] and decode[1][4] == 4 * decode[0][4]


def test_tune_ssd_tries_every_candidate_and_keeps_a_working_one(monkeypatch):
    """bench.py tune's SSD search, with the timing replaced by one run of each candidate under
    the interpreter: every candidate launches every kernel it is tried on, and the settings left
    in ssm.SSD_TILES are the chosen ones."""
    import ssm
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on CPU tensors under TRITON_INTERPRET=1; on a GPU, run bench.py tune")
    monkeypatch.setattr(ssm, "SSD_TILES", dict(ssm.SSD_TILES))
    tried = []

    def first_that_runs(name, candidates, set_launch, fn, check=None):
        for c in candidates[:2]:      # the interpreter is slow: two candidates per kernel
            set_launch(c)
            fn()
            tried.append(name)
        return c

    monkeypatch.setattr(bench, "_best", first_that_runs)
    tiles = bench.tune_ssd(1, 40, 2, 16, 16, 1, 32, device="cpu")
    assert sorted(set(tried)) == sorted(tiles) == sorted(ssm.SSD_TILES)
    assert tiles["scan"] == bench.SSD_TILE_CANDIDATES[1] and tiles["passing"] == bench.SSD_PASSING_CANDIDATES[1]

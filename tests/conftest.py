"""Shared test set-up: Triton's interpreter on machines without CUDA, fixed seeds, small fixtures.

TRITON_INTERPRET must be set before anything imports triton, so it is decided here,
when pytest loads this file, before any test module is imported.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project's files live at the repository root, one level up.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def spawn(fn, args, nprocs):
    """torch.multiprocessing.spawn(fn, args, nprocs), the processes forked from a server that has
    imported torch and the project once: a spawned process is a fresh interpreter importing torch
    (about 2 s of CPU each, and the processes of a spawn share this machine's 2 cores), which was
    most of what the multi-process tests cost. Forked from a process that has run nothing, each
    rank still starts clean: no threads, no process group, no CUDA."""
    import multiprocessing.forkserver
    import tempfile

    import torch.multiprocessing as mp
    # read when the server starts (the first call); the server imports these with this
    # process's sys.path, so the project's modules resolve as they do here
    multiprocessing.forkserver.set_forkserver_preload(["torch", "torch.distributed", "pytest", "model", "parallel"])
    # The arguments go through a file: pickled for a forkserver child, every tensor's storage
    # would travel as a file descriptor, and a forkserver takes at most 256 per process.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "args.pt")
        torch.save(args, path)
        mp.start_processes(_spawned, args=(fn, path), nprocs=nprocs, start_method="forkserver")


def _spawned(rank, fn, path):
    fn(rank, *torch.load(path, weights_only=False))


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): one
    thread is fastest there, two fight over the cores for 32-wide matmuls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def stdlib_texts():
    """About 300 KB of real text: standard-library source files (every 24th file)."""
    import tokenizer

    return [tokenizer._read_text(p) for p in tokenizer.stdlib_sources()[::24]]


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_texts):
    """A 512-token vocabulary trained on `stdlib_texts`, shared by tests that need a tokenizer."""
    import tokenizer

    return tokenizer.Tokenizer.train(stdlib_texts, vocab_size=512, verbose=False)


class Kernels:
    """The Triton kernels under test. `device` is where they run: the GPU when there is one,
    else the CPU under Triton's interpreter. on() makes kernels_on say yes for CPU tensors in
    the interpreter case (on a GPU it already does for CUDA tensors); small_tiles() shrinks
    every kernel's tiles; poison() fills every
    buffer torch.empty / empty_like hands out with NaN, so an element a kernel forgets to write
    fails the comparison."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def on(self):
        import attention
        import model
        import ssm
        if self.device.type == "cpu":
            for module in (attention, model, ssm):
                self.monkeypatch.setattr(module, "kernels_on", lambda t: True)

    def small_tiles(self, m=16, n=16):
        """Every kernel's tiles m x n (and 16 deep), so that small inputs span several tiles and
        end in partial ones; the flash kernels' settings for both dtype classes; the SSD scan's
        state pieces of 64 elements (several programs per state)."""
        import attention
        import moe
        import ssm
        flash = {kernel: dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=1) for kernel in ("fwd", "dq", "dkdv")}
        self.monkeypatch.setattr(attention, "FLASH_TILES", {"small": flash, "big": flash})
        gemm = {"fwd": dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=16, num_warps=4, num_stages=1),
                "dw": dict(BLOCK_M=n, BLOCK_K=16, BLOCK_R=m, num_warps=4, num_stages=1)}
        self.monkeypatch.setattr(moe, "GG_TILES", {"small": gemm, "big": gemm})
        launch = dict(num_warps=4, num_stages=1)
        self.monkeypatch.setattr(ssm, "SSD_TILES", {
            "states": dict(BLOCK_L=m, **launch), "states_bwd": dict(BLOCK_L=m, **launch),
            "passing": dict(BLOCK=64, **launch), "scan": dict(BLOCK_M=m, BLOCK_N=n, **launch),
            "scan_bwd_dc": dict(BLOCK_M=m, BLOCK_N=n, **launch), "scan_bwd_dx": dict(BLOCK_M=m, BLOCK_N=n, **launch)})

    def poison(self):
        empty, empty_like = torch.empty, torch.empty_like
        self.monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        self.monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


@pytest.fixture
def kernels(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU the Triton kernels run only under TRITON_INTERPRET=1")
    return Kernels(monkeypatch)

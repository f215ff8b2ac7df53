"""Tests for ssm.py: the three forms of the scan against each other (the token-by-token
recurrence is the reference), in float64 so that any difference is a bug and not rounding;
document restarts (a packed batch equals its documents run alone, the convolution included);
the mixer's cached decoding against its full forward; the Triton scan against the PyTorch
one under Triton's interpreter, gradients included."""

import math

import pytest
import torch

import ssm
from conftest import Kernels

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

F64 = torch.float64


def inputs(b=2, T=23, h=4, p=6, g=2, n=5, dtype=F64, requires_grad=False):
    """Random scan inputs with dt spread over (0.01, 1) and A over (-4, -0.1), so that some heads
    forget within a few tokens and others remember the whole sequence."""
    x = torch.randn(b, T, h, p, dtype=dtype)
    dt = (torch.rand(b, T, h, dtype=dtype) + 0.01).clamp(max=1)
    A = -(torch.rand(h, dtype=dtype) * 3.9 + 0.1)
    B, C = torch.randn(b, T, g, n, dtype=dtype), torch.randn(b, T, g, n, dtype=dtype)
    out = [x, dt, A, B, C]
    return [t.requires_grad_() for t in out] if requires_grad else out


def resets(b, T, starts):
    """reset (b, T) with True at each row's document starts, or None."""
    if starts is None:
        return None
    r = torch.zeros(b, T, dtype=torch.bool)
    for row, cols in enumerate(starts):
        r[row, cols] = True
    return r


def test_segsum_is_the_sum_between_two_tokens():
    a = torch.randn(3, 7, dtype=F64)
    S = ssm.segsum(a)
    for i in range(7):
        for j in range(7):
            want = a[:, j + 1:i + 1].sum(-1) if j <= i else torch.full((3,), -math.inf, dtype=F64)
            torch.testing.assert_close(S[:, i, j], want)


@pytest.mark.parametrize("T,chunk,h,g", [(23, 8, 4, 2), (16, 16, 2, 1), (5, 64, 4, 4), (31, 1, 2, 2), (40, 6, 3, 1)])
def test_chunked_equals_sequential(T, chunk, h, g):
    x, dt, A, B, C = inputs(T=T, h=h, g=g)
    y_ref, s_ref = ssm.ssd_sequential(x, dt, A, B, C)
    y, s = ssm.ssd_chunked(x, dt, A, B, C, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_chunked_equals_sequential_with_restarts_and_an_initial_state(chunk):
    x, dt, A, B, C = inputs(T=21)
    # row 0: a restart inside a chunk and one on a chunk boundary (t=8); row 1: a restart at
    # t=0, which drops the initial state, and two adjacent one-token documents
    reset = resets(2, 21, [[3, 8, 19], [0, 10, 11]])
    state = torch.randn(2, 4, 6, 5, dtype=F64)
    y_ref, s_ref = ssm.ssd_sequential(x, dt, A, B, C, reset, state)
    y, s = ssm.ssd_chunked(x, dt, A, B, C, reset, state, chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    # the restart really cut the state: row 1 ignores the initial state everywhere
    y0, _ = ssm.ssd_sequential(x[1:], dt[1:], A, B[1:], C[1:], reset[1:], None)
    torch.testing.assert_close(y[1:], y0, rtol=1e-10, atol=1e-10)


def test_chunked_gradients_equal_sequential_gradients():
    x, dt, A, B, C = inputs(T=13, requires_grad=True)
    state = torch.randn(2, 4, 6, 5, dtype=F64, requires_grad=True)
    reset = resets(2, 13, [[6], [2, 9]])
    w = torch.randn(2, 13, 4, 6, dtype=F64)
    grads = []
    for scan in (ssm.ssd_sequential, lambda *a: ssm.ssd_chunked(*a, chunk_size=4)):
        y, s = scan(x, dt, A, B, C, reset, state)
        grads.append(torch.autograd.grad((y * w).sum() + s.sum(), (x, dt, A, B, C, state)))
    for g_chunked, g_seq in zip(*grads[::-1]):
        torch.testing.assert_close(g_chunked, g_seq, rtol=1e-9, atol=1e-10)


def test_a_packed_row_equals_its_documents_alone():
    x, dt, A, B, C = inputs(b=1, T=17)
    lengths = [6, 1, 10]
    reset = torch.zeros(1, 17, dtype=torch.bool)
    reset[0, [0, 6, 7]] = True
    y, _ = ssm.ssd_chunked(x, dt, A, B, C, reset, chunk_size=4)
    alone = [ssm.ssd_sequential(*(t.split(lengths, dim=1)[i] for t in (x, dt)), A,
                                *(t.split(lengths, dim=1)[i] for t in (B, C)))[0] for i in range(3)]
    torch.testing.assert_close(y, torch.cat(alone, 1), rtol=1e-10, atol=1e-10)


def test_step_by_step_decoding_equals_the_chunked_scan():
    """ssd_step, as decoding runs it, continuing from the chunked scan's final state."""
    x, dt, A, B, C = inputs(T=19)
    y_all, s_all = ssm.ssd_chunked(x, dt, A, B, C, chunk_size=4)
    y, state = ssm.ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], chunk_size=4)
    ys = [y]
    for t in range(11, 19):
        y_t, state = ssm.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, s_all, rtol=1e-10, atol=1e-10)


# -----------------------------------------------------------------------------
# The mixer

def mixer(**kw):
    torch.manual_seed(1)
    m = ssm.Mamba2(**{**dict(dim=24, n_heads=4, head_dim=8, d_state=6, n_groups=2, d_conv=4, chunk_size=4), **kw})
    with torch.no_grad():   # weights away from the init, so that every path matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.double().eval()


@pytest.mark.parametrize("kw", [{}, dict(n_groups=1, d_conv=2, conv_bias=False, proj_bias=True)])
def test_mixer_decoding_with_a_cache_equals_the_full_forward(kw):
    """A prompt in two pieces (the conv window and the state cross the cut), then one token at a
    time through the recurrent step: every output equals the full forward's."""
    m = mixer(**kw)
    u = torch.randn(2, 15, 24, dtype=F64)
    with torch.no_grad():
        full = m(u)
        cache = ssm.SSMCache(1)
        pieces = [m(u[:, :6], cache=cache, layer=0), m(u[:, 6:9], cache=cache, layer=0)]
        pieces += [m(u[:, t:t + 1], cache=cache, layer=0) for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    # float64: the last K-1 conv inputs and the (heads, P, N) state per row, whatever the length
    assert cache.nbytes() == 2 * 8 * ((m.conv1d.kernel_size[0] - 1) * m.conv_dim + 4 * 8 * 6)


def test_mixer_restarts_its_convolution_and_state_at_document_starts():
    """Documents shorter than the convolution's 4 taps too: nothing of one reaches the next."""
    m = mixer()
    lengths = [2, 7, 1, 5]
    u = torch.randn(1, sum(lengths), 24, dtype=F64)
    reset = torch.zeros(1, sum(lengths), dtype=torch.bool)
    reset[0, [0, 2, 9, 10]] = True
    with torch.no_grad():
        packed = m(u, reset)
        alone = torch.cat([m(part) for part in u.split(lengths, dim=1)], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_a_restart_while_decoding_forgets_the_cache():
    m = mixer()
    u = torch.randn(1, 9, 24, dtype=F64)
    with torch.no_grad():
        cache = ssm.SSMCache(1)
        m(u[:, :5], cache=cache, layer=0)
        step = m(u[:, 5:6], torch.ones(1, 1, dtype=torch.bool), cache, 0)
        fresh = m(u[:, 5:6])
    torch.testing.assert_close(step, fresh, rtol=1e-10, atol=1e-10)


def test_mixer_init():
    m = ssm.Mamba2(dim=64, n_heads=16, head_dim=8, d_state=4)
    A = -m.A_log.exp()
    assert A.max() <= -1 and A.min() >= -16
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.all(m.D == 1)
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be divisible by n_groups \(4\)"):
        ssm.Mamba2(dim=64, n_heads=6, head_dim=8, n_groups=4)


def test_demo(capsys):
    ssm._demo(lengths=(64, 128), contexts=(16, 32), dim=64)
    out = capsys.readouterr().out
    assert "Mamba-2 ms" in out and "KV cache" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("64 ", "128 ", "16 ", "32 "))]) == 4


# -----------------------------------------------------------------------------
# The Triton scan, under the interpreter on machines without CUDA: small shapes and 16-wide
# tiles, so that a chunk spans several row and column tiles and ends in partial ones.

@pytest.fixture
def scan(kernels, monkeypatch):
    """triton_scan with 16-wide tiles and poisoned buffers (an element a kernel forgets to write
    is NaN). Returns a function that runs it on the kernels' device and gives back y, the final
    state and the gradients of a random linear loss on the CPU."""
    kernels.poison()
    kernels.small_tiles()
    dev = kernels.device

    def run(inputs, reset, chunk_size, grads=None):
        inputs = [None if t is None else t.detach().to(dev).requires_grad_(grads is not None) for t in inputs]
        x, dt, A, B, C, state = inputs
        y, final = ssm.triton_scan(x, dt, A, B, C, None if reset is None else reset.to(dev), state, chunk_size)
        got = [] if grads is None else torch.autograd.grad(
            (y, final), [t for t in inputs if t is not None], [g.to(dev) for g in grads])
        return y.detach().cpu(), final.detach().cpu(), [g.cpu() for g in got]
    return run


def make_inputs(b, T, h, g, P, N, with_state, seed, decay=1.0):
    """Random scan inputs; `decay` scales A (|dt A| averages 0.36 decay per token)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, P, generator=gen)
    dt = torch.rand(b, T, h, generator=gen) * 0.5 + 0.05
    A = -(torch.rand(h, generator=gen) * 2 + 0.2) * decay
    B = torch.randn(b, T, g, N, generator=gen)
    C = torch.randn(b, T, g, N, generator=gen)
    state = torch.randn(b, h, P, N, generator=gen) if with_state else None
    return [x, dt, A, B, C, state]


# b, T, heads, groups, P, N, chunk, document starts per row, initial state, decay scale
CASES = {
    "one-document": (1, 32, 2, 1, 16, 16, 32, None, False, 1),
    "ragged-T-state": (2, 70, 4, 1, 12, 10, 32, None, True, 1),
    # a reset at t=0 (the given state is dropped), exactly at a chunk boundary (32), mid-chunk,
    # two in one chunk, and a one-token document
    "documents-g2": (2, 70, 4, 2, 12, 10, 32, [[0, 32, 50], [5, 40, 41, 69]], True, 1),
    "documents-no-state": (2, 45, 4, 2, 16, 16, 32, [[10, 32], [1, 31]], False, 1),
    # a chunk of 24 ends in a partial tile of 16; P and N beyond one padded tile
    "chunk24-wide": (1, 50, 2, 1, 20, 18, 24, [[24, 30]], True, 1),
    "single-token": (1, 1, 2, 1, 16, 16, 32, None, True, 1),
    # chunk-local log-decays of a few hundred: the kernels' exp(cum_m - cum_l), a difference
    # of two large sums, against ssd_chunked's direct segment sums
    "strong-decay": (1, 128, 2, 1, 16, 16, 64, None, True, 8),
}


def reference(inputs, reset, chunk_size, grads=None):
    """ssd_chunked in float64: y, the final state and the gradients."""
    wide = [None if t is None else t.double().requires_grad_(grads is not None) for t in inputs]
    y, final = ssm.ssd_chunked(*wide[:5], reset, wide[5], chunk_size)
    got = [] if grads is None else torch.autograd.grad(
        (y, final), [t for t in wide if t is not None], [g.double() for g in grads])
    return y.detach(), final.detach(), list(got)


def close(got, want, tol, what):
    err = ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_triton_scan_equals_the_chunked_reference(case, scan):
    b, T, h, g, P, N, L, starts, with_state, decay = CASES[case]
    inputs = make_inputs(b, T, h, g, P, N, with_state, seed=len(case), decay=decay)
    reset = resets(b, T, starts)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(b, T, h, P, generator=gen), torch.randn(b, h, P, N, generator=gen)]
    y, final, got = scan(inputs, reset, L, grads)
    want_y, want_final, want = reference(inputs, reset, L, grads)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-5, atol=1e-5)
    names = [n for n, t in zip(["x", "dt", "A", "B", "C", "state"], inputs) if t is not None]
    for name, a, w in zip(names, got, want):
        close(a, w, 1e-4, f"d{name}")


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", ["documents-g2", "chunk24-wide"])
def test_triton_scan_with_unequal_tiles(case, tiles, scan, monkeypatch):
    # The default tiles differ between rows and columns: the causal bounds round to each
    # kernel's own tiles, and a tile may be larger than what is left of the chunk.
    Kernels(monkeypatch).small_tiles(*tiles)
    test_triton_scan_equals_the_chunked_reference(case, scan)


def test_triton_scan_equals_the_recurrence(scan):
    """Against the token-by-token recurrence itself, with documents and an initial state."""
    b, T, h, g, P, N = 2, 40, 4, 2, 12, 10
    inputs = make_inputs(b, T, h, g, P, N, True, seed=3)
    reset = resets(b, T, [[0, 16, 17], [20, 39]])
    y, final, _ = scan(inputs, reset, 16)
    want_y, want_final = ssm.ssd_sequential(*(t.double() for t in inputs[:5]), reset, inputs[5].double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-5, atol=1e-5)


def test_triton_scan_takes_16_bit_inputs(scan):
    """bf16 x, B, C (as under autocast) are computed in float32: only the inputs' rounding shows."""
    b, T, h, g, P, N = 1, 40, 2, 1, 16, 16
    inputs = make_inputs(b, T, h, g, P, N, False, seed=4)
    for i in (0, 3, 4):
        inputs[i] = inputs[i].bfloat16()
    y, final, _ = scan(inputs, None, 32)
    want_y, want_final, _ = reference([None if t is None else t.double() for t in inputs], None, 32)
    assert y.dtype == torch.float32
    close(y, want_y, 5e-3, "y")          # loose for the GPU's tf32 dots (the interpreter's are fp32)
    close(final, want_final, 5e-3, "final state")


def test_mamba2_with_the_kernels_equals_without(scan, kernels, monkeypatch):
    """The mixer hands B and C as strided views of one projection (T a whole number of chunks:
    no padding copies them), which the kernels read in place. Output and parameter gradients as
    with ssd_chunked."""
    torch.manual_seed(0)
    dev = kernels.device
    layer = ssm.Mamba2(dim=16, n_heads=4, head_dim=8, d_state=16, n_groups=2, chunk_size=16).to(dev)
    u = torch.randn(2, 48, 16, device=dev)
    reset = resets(2, 48, [[0, 20], [0, 32]]).to(dev)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(ssm, "kernels_on", lambda t: on)
        y = layer(u, reset)
        outs.append((y, torch.autograd.grad(y.square().sum(), list(layer.parameters()))))
    (want, want_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, _), a, w in zip(layer.named_parameters(), got_grads, want_grads):
        close(a, w.double(), 1e-4, name)

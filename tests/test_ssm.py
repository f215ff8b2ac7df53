"""Tests for ssm.py: the three forms of the scan against each other (the token-by-token
recurrence is the reference), in float64 so that any difference is a bug and not rounding;
document restarts (a packed batch equals its documents run alone, the convolution included);
the mixer's cached decoding against its full forward; the Triton scan against the PyTorch
one under Triton's interpreter, gradients included."""

import math

import pytest
import torch

import ssm

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
    """reset (b, T) with True at each row's document starts."""
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
    assert cache.nbytes() == 2 * 8 * (3 * m.conv_dim if m.conv1d.kernel_size[0] == 4 else m.conv_dim) + 2 * 8 * 4 * 8 * 6


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

"""The Triton kernels compiled for a real GPU: their production tile sizes, bf16 and fp16.

The other kernel tests run everywhere (on a CPU under Triton's interpreter) with small tiles,
in float32. What only a GPU can check is here: the default 64-wide tiles and 8-warp
programs, and the half-precision tensor-core paths, which the interpreter gets wrong. Each
kernel is compared with a float64 reference computed from the same rounded inputs, by the
relative error of the whole tensor, ||got - want|| / ||want||: float32 lands near 1e-6,
bf16 (8 mantissa bits) near 4e-3, fp16 near 5e-4. Skipped without CUDA; CI has none, so run
it on a GPU machine: `pytest tests/test_gpu.py`.
"""

import pytest
import torch
import torch.nn.functional as F

import attention as A
import model
import moe
import ssm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or A.triton is None,
                                reason="the kernels compiled for real need a CUDA GPU and Triton")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 4e-3}


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def packed(B, T, gen, pad=0):
    """Rows of documents of random lengths (up to T / 3), after `pad` padding positions (-1)."""
    rows = []
    for _ in range(B):
        pos = [-1] * pad
        while len(pos) < T:
            pos += range(int(torch.randint(1, T // 3 + 2, (1,), generator=gen)))
        rows.append(pos[:T])
    return torch.tensor(rows, device="cuda")


FLASH = {   # B, H, Hkv, T, D, Dv, causal, documents: the 64 x 64 tiles, 4 and 8 warps
    "gqa-d128-causal": (2, 8, 2, 1000, 128, 128, True, False),
    "mha-d64-documents": (2, 4, 4, 777, 64, 64, True, True),
    "mla-d192-dv128-documents": (1, 4, 4, 300, 192, 128, True, True),
    "mqa-d96-bidirectional": (1, 4, 1, 333, 96, 96, False, False),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(FLASH))
def test_flash_attention_compiled(case, dtype):
    B, H, Hkv, T, D, Dv, causal, docs = FLASH[case]
    gen = torch.Generator().manual_seed(7)
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(B, h, T, d, generator=gen).to("cuda", dt) for h, d in ((H, D), (Hkv, D), (Hkv, Dv)))
    g = torch.randn(B, H, T, Dv, generator=gen).to("cuda", dt)
    pos = packed(B, T, gen, pad=3) if docs else None
    ins = leaves(q, k, v)
    out = A.flash_attention(*ins, pos, causal)
    grads = torch.autograd.grad(out, ins, g)
    # The reference: the eager formula in float64 on the same (rounded) inputs, with the mask
    # written out. Padding rows (position -1) are their own documents and see only themselves.
    ref = leaves(*(t.double() for t in (q, k, v)))
    mask = torch.ones(T, T, dtype=torch.bool, device="cuda")
    mask = (mask.tril() if causal else mask)[None]
    if docs:
        doc = A.document_ids(pos)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    want = A.attend(*ref, mask[:, None].expand(B, 1, T, T), "eager")
    want_grads = torch.autograd.grad(want, ref, g.double())
    assert out.dtype == dt and out.shape == (B, H, T, Dv)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < TOL[dtype], (name, rel(a, b))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,dim", [(4096, 576), (300, 2048), (7, 4096)])
def test_rms_norm_compiled(rows, dim, dtype):
    dt = DTYPES[dtype]
    x = (3 * torch.randn(rows, dim, device="cuda")).to(dt)
    w = (1 + 0.1 * torch.randn(dim, device="cuda")).to(dt)
    dy = torch.randn(rows, dim, device="cuda").to(dt)
    ins = leaves(x, w)
    y = model.RMSNormFunction.apply(ins[0], ins[1], 1e-6)
    grads = torch.autograd.grad(y, ins, dy)
    ref = leaves(x.double(), w.double())
    want = ref[0] * torch.rsqrt(ref[0].pow(2).mean(-1, keepdim=True) + 1e-6) * ref[1]
    want_grads = torch.autograd.grad(want, ref, dy.double())
    for name, a, b in zip(("y", "dx", "dw"), (y, *grads), (want, *want_grads)):
        assert rel(a, b) < TOL[dtype], (name, rel(a, b))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_chunked_cross_entropy_compiled(dtype):
    dt, z = DTYPES[dtype], 1e-3
    N, V, d = 3000, 49152, 576          # SmolLM2's head; several chunks of rows
    h = torch.randn(N, d, device="cuda").to(dt)
    w = (0.05 * torch.randn(V, d, device="cuda")).to(dt)
    y = torch.randint(0, V, (N,), device="cuda")
    ins = leaves(h, w)
    loss = model.ChunkedCrossEntropy.apply(ins[0], ins[1], y, z, True)[0]
    # A loss scale, as fp16 training uses (GradScaler): unscaled, dL/dh (~1e-5) is subnormal in
    # fp16 and keeps only a few bits, in any implementation.
    grads = [t.double() / 1024 for t in torch.autograd.grad(loss * 1024, ins)]
    ref = leaves(h.double(), w.double())
    logits = ref[0] @ ref[1].T
    want = F.cross_entropy(logits, y) + z * logits.logsumexp(-1).pow(2).mean()
    want_grads = torch.autograd.grad(want, ref)
    assert abs(loss.item() - want.item()) / want.item() < TOL[dtype] / 4
    for name, a, b in zip(("dh", "dw"), grads, want_grads):
        assert rel(a, b) < TOL[dtype], (name, rel(a, b))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_grouped_mm_compiled(dtype):
    dt = DTYPES[dtype]
    counts = [700, 0, 1, 64, 129, 0, 2000, 33]   # empty experts, one row, exact and ragged tiles
    N, M, K = sum(counts), 384, 200
    offsets = torch.tensor([0] + counts, device="cuda").cumsum(0)
    x = torch.randn(N, K, device="cuda").to(dt)
    w = (torch.randn(len(counts), M, K, device="cuda") / K ** 0.5).to(dt)
    dy = torch.randn(N, M, device="cuda").to(dt)
    ins = leaves(x, w)
    y = moe.GroupedMM.apply(ins[0], ins[1], offsets)
    grads = torch.autograd.grad(y, ins, dy)
    ref = leaves(x.double(), w.double())
    want = moe.grouped_mm_reference(ref[0], ref[1], offsets)
    want_grads = torch.autograd.grad(want, ref, dy.double())
    for name, a, b in zip(("y", "dx", "dw"), (y, *grads), (want, *want_grads)):
        assert rel(a, b) < TOL[dtype], (name, rel(a, b))
    # The empty experts' weight gradients are zeros, written, not left as torch.empty's garbage.
    assert grads[1][[1, 5]].abs().max().item() == 0


SSD = {   # b, T, heads, groups, P, N, chunk, document starts: Mamba-2's real head and state sizes
    "p64-n128-T2000": (2, 2000, 8, 1, 64, 128, 64, None),
    "p64-n64-g2-documents": (1, 1500, 8, 2, 64, 64, 64, [0, 700, 701, 1300]),
    "p32-n16-chunk128": (1, 777, 4, 1, 32, 16, 128, [100]),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(SSD))
def test_ssd_scan_compiled(case, dtype):
    """The Triton SSD scan at its production tiles against ssd_chunked in float64, forward and
    every gradient. The scan computes in float32 (tf32 dots for bf16 inputs)."""
    b, T, h, g, P, N, L, starts = SSD[case]
    gen = torch.Generator().manual_seed(3)
    dt = DTYPES[dtype]
    x = torch.randn(b, T, h, P, generator=gen).to("cuda", dt)
    dts = (torch.rand(b, T, h, generator=gen) * 0.1 + 0.001).cuda()
    A = -(torch.rand(h, generator=gen) * 15 + 1).cuda()
    B, C = (torch.randn(b, T, g, N, generator=gen).to("cuda", dt) for _ in range(2))
    state = torch.randn(b, h, P, N, generator=gen).cuda()
    reset = None
    if starts:
        reset = torch.zeros(b, T, dtype=torch.bool, device="cuda")
        reset[:, starts] = True
    dy, dfinal = torch.randn(b, T, h, P, device="cuda"), torch.randn(b, h, P, N, device="cuda")
    ins = leaves(x, dts, A, B, C, state)
    y, final = ssm.triton_scan(*ins[:5], reset, ins[5], L)
    grads = torch.autograd.grad((y, final), ins, (dy, dfinal))
    ref = leaves(*(t.double() for t in (x, dts, A, B, C, state)))
    want, want_final = ssm.ssd_chunked(*ref[:5], reset, ref[5], L)
    want_grads = torch.autograd.grad((want, want_final), ref, (dy.double(), dfinal.double()))
    tol = 1e-4 if dtype == "fp32" else 2e-2   # fp32: the decays' cumsum differences; bf16: tf32 dots
    for name, a, w in zip(("y", "final", "dx", "ddt", "dA", "dB", "dC", "dstate"),
                          (y, final, *grads), (want, want_final, *want_grads)):
        assert rel(a, w) < tol, (name, rel(a, w))


@pytest.mark.parametrize("moe_layers", [False, True, "hybrid"])
def test_training_step_kernels_on_equals_off(moe_layers):
    """One bf16-autocast step of a small model with every kernel on, and again with every one
    off (sdpa, torch's RMSNorm and loss, the expert loop, the PyTorch scan): the same loss and
    gradients, to bf16. "hybrid": Mamba-2 layers beside attention, no experts."""
    moe_fields = (dict(mixers="MAMA") if moe_layers == "hybrid" else
                  dict(n_experts=8, top_k=2, d_expert=128) if moe_layers else {})
    cfg = model.preset("tiny", n_layer=4, max_seq_len=512, **moe_fields)
    m = model.Model(cfg).cuda()
    x = torch.randint(0, cfg.vocab_size, (4, 513), device="cuda")
    pos = torch.cat([torch.arange(200), torch.arange(312)]).repeat(4, 1).cuda()

    def step():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            _, loss, _ = m(x[:, :-1], labels=x[:, 1:], position_ids=pos)
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}

    on = step()
    saved = A.kernels_on, model.kernels_on, moe.kernels_on, ssm.kernels_on
    A.kernels_on = model.kernels_on = moe.kernels_on = ssm.kernels_on = lambda t: False
    try:
        off = step()
    finally:
        A.kernels_on, model.kernels_on, moe.kernels_on, ssm.kernels_on = saved
    assert abs(on[0].item() - off[0].item()) < 1e-2 * off[0].item()
    assert on[1].keys() == off[1].keys()
    worst = max(rel(on[1][n], off[1][n]) for n in off[1])
    # With experts, a token whose top-k choice is a near tie may flip between the two runs
    # (bf16 hidden states differ in the last bit), moving its gradient to another expert.
    assert worst < (0.15 if moe_layers is True else 5e-2), worst

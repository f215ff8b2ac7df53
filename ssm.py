"""
ssm.py: Mamba-2, a sequence mixer whose cost grows linearly with the context, not quadratically.

The concept. Attention compares every token with every earlier one: O(T^2) work per sequence,
and a KV cache that grows with every generated token. A state space model (SSM) instead carries
a fixed-size state through the sequence: each token decays the state, writes into it, and reads
its output from it. Mamba-2's layer, per head (P channels, a state of N numbers per channel):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T          h: (P, N), x_t: (P,), B_t: (N,)
    y_t = h_t C_t + D * x_t                                    C_t: (N,)

A < 0 is a learned per-head rate (stored as A_log); dt_t > 0, B_t and C_t are computed from the
token itself ("selective": the model decides per token how much to forget and what to write).
Decoding is a constant amount of work and memory per token, whatever the context length.

Training cannot afford a loop over T. The state space dual (SSD, Dao & Gu 2024) view unrolls the
recurrence: y_t = sum_{s<=t} (C_t . B_s) exp(A (dt_{s+1} + ... + dt_t)) dt_s x_s, which is
causal attention with C as queries, B as keys, dt*x as values and a decay mask in place of the
softmax. The chunked algorithm cuts the sequence into chunks of L tokens and mixes both forms:
inside a chunk, that quadratic "attention" form (matmuls, what GPUs are good at); between
chunks, only the (P x N) state is passed on. Work: O(T L (N + P) + T P N), linear in T.

Around the scan, the Mamba-2 mixer: one input projection gives (z, x, B, C, dt); x, B and C go
through a short causal depthwise convolution (4 taps) and SiLU; dt through softplus with a bias;
the scan; the D skip; a gated RMSNorm, norm(y * silu(z)); the output projection. B and C are
shared by groups of heads (n_groups, like GQA's K/V heads).

Three forms of the same function are here, and the tests hold them equal:
- `ssd_sequential`: the recurrence, one token at a time. Obvious, slow; the reference.
- `ssd_chunked`: the chunked SSD algorithm in PyTorch, written step by step.
- `ssd_step`: one token of the recurrence, for decoding with a conv cache and an SSM state cache.
plus the Triton kernels of the chunked scan (forward and backward), which run on CUDA.

Packed training rows hold several documents. A document starts where position_ids restart at 0,
and there the state (and the convolution's window) starts from zero: packed documents never
leak into each other, as attention's intra-document mask guarantees for attention layers.

The playbook's lessons: hybrids (a few attention layers among many SSM layers: Jamba,
Nemotron-H, Falcon-H1, Granite-4.0-h, Bamba) keep most of attention's quality with a fraction of
its long-context cost; pure SSMs struggle with exact recall (copying, retrieval), which the
attention layers supply. Decoding memory is what changes most: a fixed state per layer instead
of a KV cache that grows with the context.

Papers: Gu & Dao 2023 (Mamba: selective state spaces); Dao & Gu 2024 (Mamba-2: transformers are
SSMs, state space duality); Lieber et al. 2024 (Jamba); NVIDIA 2025 (Nemotron-H); Waleffe et
al. 2024 (an empirical study of Mamba-based language models); Gu et al. 2022 (S4D: the A init).

Run:
    python ssm.py      # time and memory against sequence length, SSM against attention, on this
                       # CPU (linear against quadratic); decode time per token against context

Status: the three forms and the mixer (tested against each other in float64, and through
model.py against transformers' Mamba2 and Bamba); the Triton scan, forward and backward, tested
under Triton's interpreter only: it has not yet been compiled or timed on a GPU.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:     # macOS, or a CPU-only install: the PyTorch references run
    triton = None


def kernels_on(t):
    """Whether the Triton kernels run for tensor t: on CUDA, when Triton is installed, unless the
    environment says NANOPLAYBOOK_KERNELS=0 (as attention.kernels_on; a leaf keeps its own).
    The tests turn them on for CPU tensors under Triton's interpreter."""
    return triton is not None and t.is_cuda and os.environ.get("NANOPLAYBOOK_KERNELS", "1") != "0"


# -----------------------------------------------------------------------------
# The scan, three ways. Shapes everywhere:
#   x (batch, T, heads, P)       the values, per head
#   dt (batch, T, heads)         the step sizes, > 0 (after softplus)
#   A (heads,)                   the decay rates, < 0
#   B, C (batch, T, groups, N)   the write and read vectors; heads h uses group h // (heads / groups)
#   reset (batch, T) bool        True where a document starts (position_ids == 0): the state is
#                                zeroed before that token; None: no restarts
#   state (batch, heads, P, N)   the state before the first token (None: zeros)
# Each returns y (batch, T, heads, P), without the D skip, and the state after the last token.
# The scans run in float32 whatever the input dtype: the decay products underflow in bf16.

def _wide(t):
    """float32, or float64 for a float64 input (the tests' exact references)."""
    return t if t.dtype == torch.float64 else t.float()


def _heads(t, n_heads):
    """(batch, ..., groups, N) -> (batch, ..., heads, N): each group's vector for its heads."""
    return t.repeat_interleave(n_heads // t.shape[-2], dim=-2)


def ssd_step(state, x, dt, A, B, C, reset=None):
    """One token of the recurrence: x (batch, heads, P), dt (batch, heads), B, C (batch, groups, N),
    reset (batch,) or None. Returns y (batch, heads, P) and the new state. What decoding runs."""
    x, dt, B, C = _wide(x), _wide(dt), _heads(_wide(B), x.shape[1]), _heads(_wide(C), x.shape[1])
    if reset is not None:
        state = state * (~reset).view(-1, 1, 1, 1)
    decay = torch.exp(dt * A)                                              # (batch, heads), in (0, 1)
    state = state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def ssd_sequential(x, dt, A, B, C, reset=None, state=None):
    """The recurrence, token by token: the reference the other two forms must equal."""
    b, T, h, p = x.shape
    if state is None:
        state = _wide(x.new_zeros(b, h, p, B.shape[-1]))
    ys = []
    for t in range(T):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], None if reset is None else reset[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


def segsum(a):
    """a (..., L) -> S (..., L, L) with S[i, j] = a[j+1] + ... + a[i] for j <= i (0 on the
    diagonal) and -inf above it, so exp(S) is the decay from token j to token i. Summed directly
    (a cumulative sum of a masked copy), not as cumsum[i] - cumsum[j]: that difference of two
    large numbers would lose the small one in float32."""
    L = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, L)                                # x[..., k, j] = a[k]
    strictly_below = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    S = x.masked_fill(~strictly_below, 0).cumsum(-2)                       # sum over j < k <= i
    return S.masked_fill(~strictly_below.logical_or(torch.eye(L, dtype=torch.bool, device=a.device)), -math.inf)


def _chunk_setup(x, dt, A, B, C, reset, chunk_size):
    """What both chunked versions start from, padded to whole chunks: X = dt * x, the log-decays
    a = dt * A, B and C, and each token's document number seg (the count of restarts so far; the
    state handed in belongs to document 0). Padding tokens have dt = 0: they neither decay nor
    write, so the final state is the last real token's."""
    b, T, h, p = x.shape
    pad = -T % chunk_size
    seg = (reset.long().cumsum(1) if reset is not None else torch.zeros(b, T, dtype=torch.long, device=x.device))
    X = _wide(x) * _wide(dt)[..., None]
    a = _wide(dt) * _wide(A)
    B, C = _wide(B), _wide(C)
    if pad:
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        a = F.pad(a, (0, 0, 0, pad))
        seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], 1)
    return X, a, B, C, seg


def ssd_chunked(x, dt, A, B, C, reset=None, state=None, chunk_size=64):
    """The chunked SSD algorithm (Dao & Gu 2024, section 6), in four steps per chunk of L tokens.
    Letters in the einsums: b batch, c chunk, l and s positions in a chunk, h head, p channel,
    n state."""
    b, T, h, p = x.shape
    n, L = B.shape[-1], chunk_size
    X, a, B, C, seg = _chunk_setup(x, dt, A, B, C, reset, chunk_size)
    nc = X.shape[1] // L
    X, a, seg = X.view(b, nc, L, h, p), a.view(b, nc, L, h).transpose(2, 3), seg.view(b, nc, L)
    B, C = _heads(B.view(b, nc, L, -1, n), h), _heads(C.view(b, nc, L, -1, n), h)
    decay = torch.exp(segsum(a))                                          # (b, c, h, l, s)
    same_doc = seg[:, :, :, None] == seg[:, :, None, :]                   # (b, c, l, s)

    # 1. Inside each chunk, the quadratic form: attention with C as queries, B as keys, X as
    #    values, and the decay (zero across a document start) for a causal mask.
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * decay * same_doc[:, :, None]
    y = torch.einsum("bchls,bcshp->bclhp", scores, X)

    # 2. Each chunk's own contribution to the state at its end: every token decayed to the end.
    to_end = decay[:, :, :, -1, :] * (seg == seg[:, :, -1:])[:, :, None]  # (b, c, h, s)
    chunk_states = torch.einsum("bcshn,bcshp->bchpn", B * to_end.transpose(2, 3)[..., None], X)

    # 3. Between chunks: the state entering chunk c is the one entering chunk c-1, decayed over
    #    all of chunk c-1, plus chunk c-1's own. A document starting inside a chunk cuts it off.
    seg_before = torch.cat([seg.new_zeros(b, 1), seg[:, :-1, -1]], 1)     # the document a chunk inherits
    carry = torch.exp(a.sum(-1)) * (seg[:, :, -1] == seg_before)[:, :, None]   # (b, c, h)
    S = X.new_zeros(b, h, p, n) if state is None else _wide(state)
    entering = []
    for c in range(nc):
        entering.append(S)
        S = S * carry[:, c, :, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, 1)                                   # (b, c, h, p, n)

    # 4. The entering state read out by every token of the chunk, decayed from the chunk's start
    #    (zero for tokens past a document start).
    from_start = torch.exp(a.cumsum(-1)) * (seg == seg_before[:, :, None])[:, :, None]   # (b, c, h, l)
    y = y + torch.einsum("bclhn,bchpn->bclhp", C * from_start.transpose(2, 3)[..., None], entering)
    return y.reshape(b, nc * L, h, p)[:, :T], S


# -----------------------------------------------------------------------------
# The Mamba-2 mixer

class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, over groups of channels (Mamba-2's norm_before_gate=False;
    one group per B/C group, so the layer splits cleanly under tensor parallelism)."""

    def __init__(self, dim, n_groups=1, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.n_groups, self.eps = n_groups, eps

    def forward(self, y, z):
        y = (_wide(y) * F.silu(_wide(z))).unflatten(-1, (self.n_groups, -1))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.flatten(-2).to(z.dtype)


def causal_conv(u, weight, bias, seg, past=None):
    """The depthwise causal convolution, u (batch, T, channels) -> same shape:
    out[t] = bias + sum_s weight[:, K-1-s] * u[t-s], over the taps s where token t-s belongs to
    token t's document (seg, (batch, T)). `past` (batch, K-1, channels) holds the inputs before
    this call (document 0, the decoding cache); None means zeros. Returns the output and the
    last K-1 inputs, zeroed where they are not of the last token's document: the next call's past.
    weight is nn.Conv1d's (channels, 1, K). A loop over the K (=4) taps, each one multiply-add."""
    b, T, ch = u.shape
    K = weight.shape[-1]
    if past is None:
        past = u.new_zeros(b, K - 1, ch)
    full = torch.cat([past.to(u.dtype), u], 1)                            # (batch, K-1+T, ch)
    seg_full = torch.cat([seg.new_zeros(b, K - 1), seg], 1)
    out = u * weight[:, 0, K - 1] if bias is None else u * weight[:, 0, K - 1] + bias
    for s in range(1, K):
        tap = full[:, K - 1 - s:K - 1 - s + T]                            # u[t - s]
        keep = (seg_full[:, K - 1 - s:K - 1 - s + T] == seg)[..., None]
        out = out + tap * keep * weight[:, 0, K - 1 - s]
    tail = full[:, -(K - 1):] * (seg_full[:, -(K - 1):] == seg[:, -1:])[..., None] if K > 1 else full[:, :0]
    return out, tail


class SSMCache:
    """What a Mamba-2 layer carries between decoding calls: the last K-1 convolution inputs
    (batch, K-1, conv channels) and the SSM state (batch, heads, P, N), per layer. Both have a
    fixed size, whatever the context length: the point of an SSM."""

    def __init__(self, n_layers):
        self.conv, self.ssm = [None] * n_layers, [None] * n_layers

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm if t is not None)


class Mamba2(nn.Module):
    """The Mamba-2 mixer. Parameter names and layout follow transformers' Mamba2Mixer (in_proj,
    conv1d, dt_bias, A_log, D, norm, out_proj), so checkpoints copy over as they are.

    dim: the model width; n_heads x head_dim: the inner width (usually 2 * dim); d_state: N;
    n_groups: B/C groups; d_conv: convolution taps; chunk_size: L of the chunked scan."""

    def __init__(self, dim, n_heads, head_dim, d_state=128, n_groups=1, d_conv=4, chunk_size=64,
                 conv_bias=True, proj_bias=False, norm_eps=1e-5, dt_min=0.001, dt_max=0.1):
        super().__init__()
        if n_heads % n_groups:
            raise ValueError(f"Mamba2: n_heads ({n_heads}) must be divisible by n_groups ({n_groups})")
        self.n_heads, self.head_dim, self.d_state, self.n_groups = n_heads, head_dim, d_state, n_groups
        self.chunk_size, self.dt_min, self.dt_max = chunk_size, dt_min, dt_max
        self.d_inner = n_heads * head_dim
        self.conv_dim = self.d_inner + 2 * n_groups * d_state            # x, B and C go through the conv
        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + n_heads, bias=proj_bias)   # z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias,
                                padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(self.d_inner, n_groups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba-2's initialisation of what is particular to an SSM (the projections are left to
        the model's init): A uniform in [1, 16] (S4D-real's range: heads forget at different
        speeds); dt_bias so that softplus(dt_bias) is log-uniform in [dt_min, dt_max] (each head
        its own time scale); D = 1; the convolution as nn.Conv1d initialises it."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))            # the inverse of softplus
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()

    def forward(self, u, reset=None, cache=None, layer=None):
        """u (batch, T, dim) -> (batch, T, dim). reset (batch, T): where documents start
        (position_ids == 0). cache: an object with per-layer lists `conv` and `ssm` (SSMCache),
        read and updated in place; one new token with a cache takes the recurrent step."""
        b, T, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        seg = reset.long().cumsum(1) if reset is not None else torch.zeros(b, T, dtype=torch.long, device=u.device)
        past = cache.conv[layer] if cache is not None else None
        xBC, tail = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias, seg, past)
        x, B, C = F.silu(xBC).split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        B, C = B.unflatten(-1, (self.n_groups, self.d_state)), C.unflatten(-1, (self.n_groups, self.d_state))
        dt = F.softplus(_wide(dt) + _wide(self.dt_bias))
        A = -torch.exp(_wide(self.A_log))
        state = cache.ssm[layer] if cache is not None else None
        if cache is not None and T == 1 and state is not None:
            y, state = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], None if reset is None else reset[:, 0])
            y = y[:, None]
        elif kernels_on(u):
            y, state = triton_scan(x, dt, A, B, C, reset, state, self.chunk_size)
        else:
            y, state = ssd_chunked(x, dt, A, B, C, reset, state, self.chunk_size)
        if cache is not None:
            cache.conv[layer], cache.ssm[layer] = tail.detach(), state.detach()
        y = y + _wide(x) * _wide(self.D)[:, None]
        return self.out_proj(self.norm(y.flatten(-2), z))



# -----------------------------------------------------------------------------
# The chunked scan in Triton (forward and backward)
#
# ssd_chunked's four steps, with the three that touch (P x N) states or (L x L) blocks as
# kernels and the cheap per-token scalars left to PyTorch, whose autograd then differentiates
# them for free:
#
#   torch:   X = dt*x, a = dt*A, seg (_chunk_setup); cum = a.cumsum inside each chunk; and from
#            cum three per-token or per-chunk factors, each with its document mask folded in:
#              to_end[l]   = exp(cum[L-1] - cum[l]) [seg_l == seg_{L-1}]    token l -> chunk end
#              from_start[m] = exp(cum[m]) [seg_m == seg_before]            chunk start -> token m
#              carry[c]    = exp(cum[L-1]) [no reset inside chunk c]        across a whole chunk
#   kernel 1 (_ChunkStates):  states[c] = sum_l to_end[l] X[l] B[l]^T               (P x N)
#   kernel 2 (_StatePassing): entering[c+1] = entering[c] carry[c] + states[c]      (loop over c)
#   kernel 3 (_ChunkScan):    y[m] = sum_{l<=m} (C_m.B_l) exp(cum_m - cum_l) [seg_m == seg_l] X[l]
#                                    + from_start[m] C_m . entering[c]
#
# Kernel 3 is the hot path: causal attention inside a chunk with C as queries, B as keys, X as
# values, and the decay mask in place of the softmax. It is tiled as flash attention is: one
# program per (chunk, tile of BLOCK_M rows), looping over tiles of BLOCK_N columns up to the
# diagonal, so the (L x L) matrix is never written out. There is no running max to keep: the
# decay is at most 1, so the plain sum cannot overflow.
#
# Numerics. The kernel forms the decay from token l to token m as exp(cum_m - cum_l), the
# difference of two cumulative sums, as do to_end and carry here; ssd_chunked sums each segment
# directly (segsum), which stays exact where cum_m and cum_l are both large and close. The
# kernel cannot afford (L x L) segment sums per tile. The difference carries an absolute error
# of about |cum| float32 epsilons, i.e. a relative error of about |cum| * 1e-7 on the decay, and
# the sums restart at every chunk: with chunk log-decays of a few hundred (the tests' strongest
# case) y and the gradients stay within about 1e-6 relative of the float64 reference.

# Groups. B and C stay (batch, T, groups, N): a kernel reads head h's group as h // (H / G), so
# they are never repeated across heads. A kernel that computes dB or dC writes it per head, and
# PyTorch sums a group's heads afterwards (one small reduction; no atomics in the kernels).
#
# Layouts. Every per-token scalar (cum, to_end, from_start, and their gradients) is a contiguous
# (batch, Tp, heads) float32 tensor, Tp the length padded to whole chunks; states and entering
# are contiguous (batch, chunks, heads, P, N). X, B and C are read through their strides (the
# mixer hands B and C as views of one projection), last dim contiguous. P and N are padded to
# powers of two (at least 16, tl.dot's minimum) inside the kernels and masked.

# Launch settings of each kernel (read at launch, so the tests can shrink them): tiles of
# tokens inside a chunk (BLOCK_L, BLOCK_M rows, BLOCK_N columns) or of flattened state elements
# (BLOCK), warps and pipelining stages. Every program holds whole (P x N) states and whole P or
# N rows, as flash attention holds a whole head dim; the tiles are chosen for the Mamba-2
# shapes (P = 64, N = 128, L = 64) and have not been tuned yet.
SSD_TILES = {
    "states": dict(BLOCK_L=32, num_warps=4, num_stages=2),        # kernel 1 forward, and dentering
    "states_bwd": dict(BLOCK_L=32, num_warps=4, num_stages=1),
    "passing": dict(BLOCK=256, num_warps=4, num_stages=1),        # kernel 2, both directions
    "scan": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    "scan_bwd_dc": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
    "scan_bwd_dx": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1),
}


def _pow2(n):
    """A head or state dim padded for tl.arange (a power of two) and tl.dot (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def _rows(t):
    """t itself when its last dim is contiguous (the kernels take the other strides as they
    come), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _group_sum(per_head, G):
    """(batch, Tp, heads, N) -> (batch, Tp, G, N): a group's gradient is the sum over its heads."""
    b, T, H, N = per_head.shape
    return per_head.view(b, T, G, H // G, N).sum(3)


if triton is not None:
    @triton.jit
    def _ssd_states_fwd(X, W, B, S, sxb, sxt, sxh, sbb, sbt, sbg,
                        T, H, G, L, P, N, PREC: tl.constexpr,
                        BLOCK_L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # One chunk of one head: S = sum_l W[l] X[l] B[l]^T, a (P x N) sum of outer products,
        # i.e. one matmul (X^T diag(W)) B accumulated over tiles of BLOCK_L tokens. The whole
        # state stays in registers, and each chunk is one program: there is no reduction
        # across programs. (The scan's backward reuses it for dentering: X = dY, W =
        # from_start, B = C.)
        c, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H     # int64: b * stride passes 2^31 at long contexts
        g = h // (H // G)
        t0 = c.to(tl.int64) * L
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        acc = tl.zeros([BP, BN], tl.float32)
        for start in range(0, L, BLOCK_L):
            l = start + tl.arange(0, BLOCK_L)
            ok = l < L
            t = t0 + l
            xt = tl.load(X + b * sxb + h * sxh + t[None, :] * sxt + p[:, None],
                         mask=ok[None, :] & (p < P)[:, None], other=0.0)           # (BP, BLOCK_L)
            w = tl.load(W + (b * T + t) * H + h, mask=ok, other=0.0)
            bk = tl.load(B + b * sbb + g * sbg + t[:, None] * sbt + n[None, :],
                         mask=ok[:, None] & (n < N)[None, :], other=0.0)          # (BLOCK_L, BN)
            acc += tl.dot(xt * w[None, :], bk, input_precision=PREC)
        tl.store(S + ((b * (T // L) + c) * H + h) * P * N + p[:, None] * N + n[None, :], acc,
                 mask=(p < P)[:, None] & (n < N)[None, :])

    @triton.jit
    def _ssd_states_bwd(X, W, B, DS, DX, DW, DB, sxb, sxt, sxh, sbb, sbt, sbg,
                        T, H, G, L, P, N, PREC: tl.constexpr,
                        BLOCK_L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # The gradients of S = sum_l W[l] X[l] B[l]^T for a tile of BLOCK_L tokens, given dS:
        #   dX[l] = W[l] dS B[l],   dB[l] = W[l] dS^T X[l],   dW[l] = X[l]^T dS B[l].
        # Each token's gradient needs only its own chunk's dS, so the tokens tile freely (one
        # program per tile: more parallel work than one per chunk) and nothing is reduced.
        pid, bh = tl.program_id(0), tl.program_id(1)
        tiles = tl.cdiv(L, BLOCK_L)
        c, lt = pid // tiles, pid % tiles
        b, h = (bh // H).to(tl.int64), bh % H
        g = h // (H // G)
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        l = lt * BLOCK_L + tl.arange(0, BLOCK_L)
        ok = l < L
        t = c.to(tl.int64) * L + l
        ds = tl.load(DS + ((b * (T // L) + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                     mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)          # (BP, BN)
        xv = tl.load(X + b * sxb + h * sxh + t[:, None] * sxt + p[None, :],
                     mask=ok[:, None] & (p < P)[None, :], other=0.0)               # (BLOCK_L, BP)
        bk = tl.load(B + b * sbb + g * sbg + t[:, None] * sbt + n[None, :],
                     mask=ok[:, None] & (n < N)[None, :], other=0.0)               # (BLOCK_L, BN)
        w = tl.load(W + (b * T + t) * H + h, mask=ok, other=0.0)
        dx = tl.dot(bk, tl.trans(ds), input_precision=PREC) * w[:, None]
        xds = tl.dot(xv, ds, input_precision=PREC)                                  # X[l]^T dS, (BLOCK_L, BN)
        tl.store(DX + ((b * T + t[:, None]) * H + h) * P + p[None, :], dx, mask=ok[:, None] & (p < P)[None, :])
        tl.store(DB + ((b * T + t[:, None]) * H + h) * N + n[None, :], xds * w[:, None],
                 mask=ok[:, None] & (n < N)[None, :])
        tl.store(DW + (b * T + t) * H + h, tl.sum(xds * bk, 1), mask=ok)

    @triton.jit
    def _ssd_passing_fwd(S, CARRY, INIT, ENT, FINAL, H, NC, PN,
                         HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        # The recurrence between chunks, entering[c+1] = entering[c] carry[c] + states[c], for
        # one head and BLOCK of its P*N state elements: the elements never mix, so the state is
        # cut into flat pieces that run in parallel, and only the loop over chunks is serial
        # (a few dozen steps of one multiply-add per element).
        bh, pid = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        i = pid * BLOCK + tl.arange(0, BLOCK)
        ok = i < PN
        if HAS_INIT:
            s = tl.load(INIT + (b * H + h) * PN + i, mask=ok, other=0.0)
        else:
            s = tl.zeros([BLOCK], tl.float32)
        for c in range(NC):
            at = ((b * NC + c) * H + h) * PN + i
            tl.store(ENT + at, s, mask=ok)
            s = s * tl.load(CARRY + (b * NC + c) * H + h) + tl.load(S + at, mask=ok, other=0.0)
        tl.store(FINAL + (b * H + h) * PN + i, s, mask=ok)

    @triton.jit
    def _ssd_passing_bwd(ENT, CARRY, DENT, DFINAL, DS, DCARRY, DINIT, H, NC, PN, BLOCK: tl.constexpr):
        # The same recurrence backwards, from the last chunk to the first. With g the gradient
        # of the state leaving chunk c (entering[c+1]):
        #   dstates[c] = g,   dcarry[c] = sum(g * entering[c]),   g <- g carry[c] + dentering[c]
        # and what is left at the start is the initial state's gradient. dcarry sums over all
        # P*N elements, which are spread over programs: each writes its partial sum to its own
        # slot (DCARRY is (batch, chunks, heads, programs)), and PyTorch adds the slots.
        bh, pid = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        i = pid * BLOCK + tl.arange(0, BLOCK)
        ok = i < PN
        g = tl.load(DFINAL + (b * H + h) * PN + i, mask=ok, other=0.0)
        for k in range(NC):
            c = NC - 1 - k
            at = ((b * NC + c) * H + h) * PN + i
            tl.store(DS + at, g, mask=ok)
            ent = tl.load(ENT + at, mask=ok, other=0.0)
            tl.store(DCARRY + ((b * NC + c) * H + h) * tl.num_programs(1) + pid, tl.sum(g * ent, 0))
            g = g * tl.load(CARRY + (b * NC + c) * H + h) + tl.load(DENT + at, mask=ok, other=0.0)
        tl.store(DINIT + (b * H + h) * PN + i, g, mask=ok)

    @triton.jit
    def _ssd_scan_fwd(X, B, C, CUM, SEG, FS, ENT, Y, sxb, sxt, sxh, sbb, sbt, sbg, scb, sct, scg,
                      T, H, G, L, P, N, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # y for BLOCK_M rows (tokens) of one chunk of one head: first the state entering the
        # chunk, read out by each row (from_start[m] C_m . entering, one (BLOCK_M x N) by
        # (N x P) dot), then the causal in-chunk "attention" over tiles of BLOCK_N columns up to
        # the diagonal. Tiles past the diagonal are never loaded: half the work of the dense
        # (L x L) form.
        pid, bh = tl.program_id(0), tl.program_id(1)
        tiles = tl.cdiv(L, BLOCK_M)
        c, mt = pid // tiles, pid % tiles
        b, h = (bh // H).to(tl.int64), bh % H
        g = h // (H // G)
        t0 = c.to(tl.int64) * L
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        tr = t0 + rows
        cq = tl.load(C + b * scb + g * scg + tr[:, None] * sct + n[None, :],
                     mask=row_ok[:, None] & (n < N)[None, :], other=0.0)           # (BLOCK_M, BN)
        cum_r = tl.load(CUM + (b * T + tr) * H + h, mask=row_ok, other=0.0)
        seg_r = tl.load(SEG + b * T + tr, mask=row_ok, other=-1)
        fs = tl.load(FS + (b * T + tr) * H + h, mask=row_ok, other=0.0)
        ent_t = tl.load(ENT + ((b * (T // L) + c) * H + h) * P * N + p[None, :] * N + n[:, None],
                        mask=(n < N)[:, None] & (p < P)[None, :], other=0.0)       # entering^T, (BN, BP)
        acc = tl.dot(cq, ent_t, input_precision=PREC) * fs[:, None]
        for start in range(0, tl.minimum(L, (mt + 1) * BLOCK_M), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < L
            tc = t0 + cols
            bk_t = tl.load(B + b * sbb + g * sbg + tc[None, :] * sbt + n[:, None],
                           mask=col_ok[None, :] & (n < N)[:, None], other=0.0)     # B^T, (BN, BLOCK_N)
            xv = tl.load(X + b * sxb + h * sxh + tc[:, None] * sxt + p[None, :],
                         mask=col_ok[:, None] & (p < P)[None, :], other=0.0)       # (BLOCK_N, BP)
            cum_c = tl.load(CUM + (b * T + tc) * H + h, mask=col_ok, other=0.0)
            seg_c = tl.load(SEG + b * T + tc, mask=col_ok, other=-2)
            ok = (rows[:, None] >= cols[None, :]) & (seg_r[:, None] == seg_c[None, :]) & col_ok[None, :]
            # exp of -inf, not a where() after the exp: above the diagonal cum_m - cum_l > 0
            # and its exp could overflow to inf before being thrown away.
            decay = tl.exp(tl.where(ok, cum_r[:, None] - cum_c[None, :], float("-inf")))
            m = tl.dot(cq, bk_t, input_precision=PREC) * decay
            acc += tl.dot(m, xv, input_precision=PREC)
        tl.store(Y + ((b * T + tr[:, None]) * H + h) * P + p[None, :], acc, mask=row_ok[:, None] & (p < P)[None, :])

    # The chunk scan's backward, derived from the forward of one chunk. With G = C B^T,
    # D[m, l] = exp(cum_m - cum_l) [seg_m == seg_l] [l <= m], M = G * D (elementwise), E the
    # entering state (P x N) and f = from_start:
    #     Y = M X + diag(f) C E^T
    # so, given dY:
    #     dX = M^T dY
    #     dM = dY X^T,   dG = dM * D               (D is a constant factor of each entry)
    #     dC = dG B + diag(f) dY E,   dB = dG^T C
    #     dcum_m += sum_l dM[m, l] M[m, l]         (d exp(cum_m - cum_l) / d cum_m = itself)
    #     dcum_l -= sum_m dM[m, l] M[m, l]         (and -itself for cum_l); dM * M = dG * G
    #     df[m] = dY[m] . (E C_m),   dE = sum_m f[m] dY[m]^T C_m
    # Two kernels split it as FlashAttention-2 does: one owns a tile of rows and loops over
    # columns (dC, the row sums of dcum, df), the other owns a tile of columns and loops over
    # rows (dX, dB, the column sums of dcum). Both recompute G and D; neither needs atomics.
    # dE sums over every row of the chunk: it has exactly the chunk states' form (X = dY,
    # weights f, B = C), so _ssd_states_fwd computes it.

    @triton.jit
    def _ssd_scan_bwd_dc(X, B, C, CUM, SEG, FS, ENT, DY, DC, DCUM, DFS,
                         sxb, sxt, sxh, sbb, sbt, sbg, scb, sct, scg,
                         T, H, G, L, P, N, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # A tile of BLOCK_M rows, looping over the column tiles up to the diagonal (the forward's
        # loop). dC and the row sums accumulate in registers; dC is written per head.
        pid, bh = tl.program_id(0), tl.program_id(1)
        tiles = tl.cdiv(L, BLOCK_M)
        c, mt = pid // tiles, pid % tiles
        b, h = (bh // H).to(tl.int64), bh % H
        g = h // (H // G)
        t0 = c.to(tl.int64) * L
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        tr = t0 + rows
        cq = tl.load(C + b * scb + g * scg + tr[:, None] * sct + n[None, :],
                     mask=row_ok[:, None] & (n < N)[None, :], other=0.0)           # (BLOCK_M, BN)
        dy = tl.load(DY + ((b * T + tr[:, None]) * H + h) * P + p[None, :],
                     mask=row_ok[:, None] & (p < P)[None, :], other=0.0)           # (BLOCK_M, BP)
        cum_r = tl.load(CUM + (b * T + tr) * H + h, mask=row_ok, other=0.0)
        seg_r = tl.load(SEG + b * T + tr, mask=row_ok, other=-1)
        fs = tl.load(FS + (b * T + tr) * H + h, mask=row_ok, other=0.0)
        ent = tl.load(ENT + ((b * (T // L) + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                      mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)         # (BP, BN)
        dfs = tl.sum(dy * tl.dot(cq, tl.trans(ent), input_precision=PREC), 1)
        dc = tl.dot(dy, ent, input_precision=PREC) * fs[:, None]
        dcum = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, tl.minimum(L, (mt + 1) * BLOCK_M), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < L
            tc = t0 + cols
            bk = tl.load(B + b * sbb + g * sbg + tc[:, None] * sbt + n[None, :],
                         mask=col_ok[:, None] & (n < N)[None, :], other=0.0)       # (BLOCK_N, BN)
            xv_t = tl.load(X + b * sxb + h * sxh + tc[None, :] * sxt + p[:, None],
                           mask=col_ok[None, :] & (p < P)[:, None], other=0.0)     # X^T, (BP, BLOCK_N)
            cum_c = tl.load(CUM + (b * T + tc) * H + h, mask=col_ok, other=0.0)
            seg_c = tl.load(SEG + b * T + tc, mask=col_ok, other=-2)
            ok = (rows[:, None] >= cols[None, :]) & (seg_r[:, None] == seg_c[None, :]) & col_ok[None, :]
            decay = tl.exp(tl.where(ok, cum_r[:, None] - cum_c[None, :], float("-inf")))
            gm = tl.dot(cq, tl.trans(bk), input_precision=PREC)
            dg = tl.dot(dy, xv_t, input_precision=PREC) * decay
            dc += tl.dot(dg, bk, input_precision=PREC)
            dcum += tl.sum(dg * gm, 1)
        tl.store(DC + ((b * T + tr[:, None]) * H + h) * N + n[None, :], dc, mask=row_ok[:, None] & (n < N)[None, :])
        tl.store(DCUM + (b * T + tr) * H + h, dcum, mask=row_ok)
        tl.store(DFS + (b * T + tr) * H + h, dfs, mask=row_ok)

    @triton.jit
    def _ssd_scan_bwd_dx(X, B, C, CUM, SEG, DY, DX, DB, DCUM,
                         sxb, sxt, sxh, sbb, sbt, sbg, scb, sct, scg,
                         T, H, G, L, P, N, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # A tile of BLOCK_N columns (keys B, values X), looping over the row tiles from the
        # diagonal to the chunk's end (rows before it never read these columns). Everything is
        # computed transposed, columns along the tile's rows, so that dX, dB and the column sums
        # accumulate in registers: M^T = (B C^T) * D^T, dX += M^T dY, dG^T = (X dY^T) * D^T,
        # dB += dG^T C. DCUM gets -colsum(dG * G): the column side of dcum.
        pid, bh = tl.program_id(0), tl.program_id(1)
        tiles = tl.cdiv(L, BLOCK_N)
        c, nt = pid // tiles, pid % tiles
        b, h = (bh // H).to(tl.int64), bh % H
        g = h // (H // G)
        t0 = c.to(tl.int64) * L
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < L
        tc = t0 + cols
        bk = tl.load(B + b * sbb + g * sbg + tc[:, None] * sbt + n[None, :],
                     mask=col_ok[:, None] & (n < N)[None, :], other=0.0)           # (BLOCK_N, BN)
        xv = tl.load(X + b * sxb + h * sxh + tc[:, None] * sxt + p[None, :],
                     mask=col_ok[:, None] & (p < P)[None, :], other=0.0)           # (BLOCK_N, BP)
        cum_c = tl.load(CUM + (b * T + tc) * H + h, mask=col_ok, other=0.0)
        seg_c = tl.load(SEG + b * T + tc, mask=col_ok, other=-2)
        dx = tl.zeros([BLOCK_N, BP], tl.float32)
        db = tl.zeros([BLOCK_N, BN], tl.float32)
        dcum = tl.zeros([BLOCK_N], tl.float32)
        for start in range(nt * BLOCK_N // BLOCK_M * BLOCK_M, L, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < L
            tr = t0 + rows
            cq = tl.load(C + b * scb + g * scg + tr[:, None] * sct + n[None, :],
                         mask=row_ok[:, None] & (n < N)[None, :], other=0.0)       # (BLOCK_M, BN)
            dy = tl.load(DY + ((b * T + tr[:, None]) * H + h) * P + p[None, :],
                         mask=row_ok[:, None] & (p < P)[None, :], other=0.0)       # (BLOCK_M, BP)
            cum_r = tl.load(CUM + (b * T + tr) * H + h, mask=row_ok, other=0.0)
            seg_r = tl.load(SEG + b * T + tr, mask=row_ok, other=-1)
            ok = (rows[None, :] >= cols[:, None]) & (seg_c[:, None] == seg_r[None, :]) & row_ok[None, :]
            decay_t = tl.exp(tl.where(ok, cum_r[None, :] - cum_c[:, None], float("-inf")))   # (BLOCK_N, BLOCK_M)
            gt = tl.dot(bk, tl.trans(cq), input_precision=PREC)
            dx += tl.dot(gt * decay_t, dy, input_precision=PREC)
            dgt = tl.dot(xv, tl.trans(dy), input_precision=PREC) * decay_t
            db += tl.dot(dgt, cq, input_precision=PREC)
            dcum -= tl.sum(dgt * gt, 1)
        tl.store(DX + ((b * T + tc[:, None]) * H + h) * P + p[None, :], dx, mask=col_ok[:, None] & (p < P)[None, :])
        tl.store(DB + ((b * T + tc[:, None]) * H + h) * N + n[None, :], db, mask=col_ok[:, None] & (n < N)[None, :])
        tl.store(DCUM + (b * T + tc) * H + h, dcum, mask=col_ok)


class _ChunkStates(torch.autograd.Function):
    """Kernel 1: states (batch, chunks, heads, P, N) = sum over each chunk's tokens of
    to_end[l] X[l] B[l]^T. Saves its three inputs (X and B are saved by the scan anyway; to_end
    is one number per token): the backward's dX needs B and to_end, dB needs X and to_end."""

    @staticmethod
    def forward(ctx, X, to_end, B, L, prec):
        b, T, H, P = X.shape
        G, N = B.shape[2:]
        states = torch.empty(b, T // L, H, P, N, dtype=torch.float32, device=X.device)
        _ssd_states_fwd[(T // L, b * H)](X, to_end, B, states, *X.stride()[:3], *B.stride()[:3],
                                         T, H, G, L, P, N, PREC=prec, BP=_pow2(P), BN=_pow2(N),
                                         **SSD_TILES["states"])
        ctx.save_for_backward(X, to_end, B)
        ctx.L, ctx.prec = L, prec
        return states

    @staticmethod
    def backward(ctx, dstates):
        X, to_end, B = ctx.saved_tensors
        b, T, H, P = X.shape
        G, N = B.shape[2:]
        L, launch = ctx.L, SSD_TILES["states_bwd"]
        dX = torch.empty(b, T, H, P, dtype=torch.float32, device=X.device)
        dw = torch.empty(b, T, H, dtype=torch.float32, device=X.device)
        dB = torch.empty(b, T, H, N, dtype=torch.float32, device=X.device)     # per head
        _ssd_states_bwd[(T // L * triton.cdiv(L, launch["BLOCK_L"]), b * H)](
            X, to_end, B, dstates.contiguous(), dX, dw, dB, *X.stride()[:3], *B.stride()[:3],
            T, H, G, L, P, N, PREC=ctx.prec, BP=_pow2(P), BN=_pow2(N), **launch)
        return dX, dw, _group_sum(dB, G), None, None


class _StatePassing(torch.autograd.Function):
    """Kernel 2: (states, carry, initial state or None) -> (entering, final state): the state
    entering each chunk and the one after the last. Saves entering (its own output, needed for
    dcarry) and carry; the states themselves are not needed by the backward."""

    @staticmethod
    def forward(ctx, states, carry, init):
        b, nc, H, P, N = states.shape
        entering = torch.empty_like(states)
        final = torch.empty(b, H, P, N, dtype=torch.float32, device=states.device)
        launch = SSD_TILES["passing"]
        _ssd_passing_fwd[(b * H, triton.cdiv(P * N, launch["BLOCK"]))](
            states, carry, states if init is None else init, entering, final, H, nc, P * N,
            HAS_INIT=init is not None, **launch)
        ctx.save_for_backward(entering, carry)
        ctx.has_init = init is not None
        return entering, final

    @staticmethod
    def backward(ctx, dentering, dfinal):
        entering, carry = ctx.saved_tensors
        b, nc, H, P, N = entering.shape
        launch = SSD_TILES["passing"]
        programs = triton.cdiv(P * N, launch["BLOCK"])
        dstates = torch.empty_like(entering)
        dcarry = torch.empty(b, nc, H, programs, dtype=torch.float32, device=entering.device)   # partial sums
        dinit = torch.empty(b, H, P, N, dtype=torch.float32, device=entering.device)
        _ssd_passing_bwd[(b * H, programs)](entering, carry, dentering.contiguous(), dfinal.contiguous(),
                                            dstates, dcarry, dinit, H, nc, P * N, **launch)
        return dstates, dcarry.sum(-1), dinit if ctx.has_init else None


class _ChunkScan(torch.autograd.Function):
    """Kernel 3: y (batch, Tp, heads, P) from X, B, C, the chunk-local cumulative log-decays cum
    and document numbers seg, from_start and the entering states. Saves its inputs, nothing
    computed: the backward recomputes G = C B^T and the decays tile by tile, as flash attention
    recomputes P, so no (L x L) matrix is ever stored."""

    @staticmethod
    def forward(ctx, X, B, C, cum, seg, from_start, entering, L, prec):
        b, T, H, P = X.shape
        G, N = B.shape[2:]
        launch = SSD_TILES["scan"]
        y = torch.empty(b, T, H, P, dtype=torch.float32, device=X.device)
        _ssd_scan_fwd[(T // L * triton.cdiv(L, launch["BLOCK_M"]), b * H)](
            X, B, C, cum, seg, from_start, entering, y, *X.stride()[:3], *B.stride()[:3], *C.stride()[:3],
            T, H, G, L, P, N, PREC=prec, BP=_pow2(P), BN=_pow2(N), **launch)
        ctx.save_for_backward(X, B, C, cum, seg, from_start, entering)
        ctx.L, ctx.prec = L, prec
        return y

    @staticmethod
    def backward(ctx, dy):
        X, B, C, cum, seg, from_start, entering = ctx.saved_tensors
        b, T, H, P = X.shape
        G, N = B.shape[2:]
        L, dev = ctx.L, X.device
        dy = dy.contiguous()                     # the kernels read dY in y's (contiguous) layout
        meta = dict(PREC=ctx.prec, BP=_pow2(P), BN=_pow2(N))
        strides = (*X.stride()[:3], *B.stride()[:3], *C.stride()[:3])
        dC = torch.empty(b, T, H, N, dtype=torch.float32, device=dev)          # per head
        dcum_rows = torch.empty(b, T, H, dtype=torch.float32, device=dev)
        dfs = torch.empty(b, T, H, dtype=torch.float32, device=dev)
        launch = SSD_TILES["scan_bwd_dc"]
        _ssd_scan_bwd_dc[(T // L * triton.cdiv(L, launch["BLOCK_M"]), b * H)](
            X, B, C, cum, seg, from_start, entering, dy, dC, dcum_rows, dfs, *strides,
            T, H, G, L, P, N, **meta, **launch)
        dX = torch.empty(b, T, H, P, dtype=torch.float32, device=dev)
        dB = torch.empty(b, T, H, N, dtype=torch.float32, device=dev)          # per head
        dcum_cols = torch.empty(b, T, H, dtype=torch.float32, device=dev)
        launch = SSD_TILES["scan_bwd_dx"]
        _ssd_scan_bwd_dx[(T // L * triton.cdiv(L, launch["BLOCK_N"]), b * H)](
            X, B, C, cum, seg, dy, dX, dB, dcum_cols, *strides,
            T, H, G, L, P, N, **meta, **launch)
        # dE = sum_m from_start[m] dY[m]^T C_m over each chunk: kernel 1's forward.
        dentering = torch.empty_like(entering)
        _ssd_states_fwd[(T // L, b * H)](dy, from_start, C, dentering, *dy.stride()[:3], *C.stride()[:3],
                                         T, H, G, L, P, N, **meta, **SSD_TILES["states"])
        return (dX, _group_sum(dB, G), _group_sum(dC, G), dcum_rows + dcum_cols, None, dfs, dentering,
                None, None)


def triton_scan(x, dt, A, B, C, reset=None, state=None, chunk_size=64):
    """ssd_chunked with its three heavy steps as Triton kernels: the same arguments and results
    (to float32 rounding), differentiable in x, dt, A, B, C and state. Inputs in float32, bf16
    or fp16, computed in float32 (float64, the tests' exact references, runs ssd_chunked)."""
    if x.dtype == torch.float64:
        return ssd_chunked(x, dt, A, B, C, reset, state, chunk_size)
    b, T, h, p = x.shape
    L = chunk_size
    # fp32 inputs get fp32 dots. 16-bit inputs come with at most 10 mantissa bits, so tf32
    # dots (10 bits, on the tensor cores) add errors of the order the inputs already carry.
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    X, a, B, C, seg = _chunk_setup(x, dt, A, B, C, reset, L)
    Tp = X.shape[1]
    nc = Tp // L
    # The per-token factors, in PyTorch (autograd carries dcum back to dt and A through them):
    # cum is the chunk-local cumulative log-decay; the masks are ssd_chunked's.
    cum = a.view(b, nc, L, h).cumsum(2)                                   # (b, c, l, h)
    segc = seg.view(b, nc, L)
    seg_before = torch.cat([segc.new_zeros(b, 1), segc[:, :-1, -1]], 1)  # the document a chunk inherits
    to_end = torch.exp(cum[:, :, -1:] - cum) * (segc == segc[:, :, -1:])[..., None]
    from_start = torch.exp(cum) * (segc == seg_before[:, :, None])[..., None]
    carry = torch.exp(cum[:, :, -1]) * (segc[:, :, -1] == seg_before)[..., None]   # (b, c, h)
    B, C = _rows(B), _rows(C)
    states = _ChunkStates.apply(X, to_end.reshape(b, Tp, h), B, L, prec)
    entering, final = _StatePassing.apply(states, carry.contiguous(),
                                          None if state is None else state.float().contiguous())
    y = _ChunkScan.apply(X, B, C, cum.reshape(b, Tp, h), seg.contiguous(), from_start.reshape(b, Tp, h),
                         entering, L, prec)
    return y[:, :T], final


# -----------------------------------------------------------------------------
# The demo: linear against quadratic, on this machine

def _saved_bytes(fn):
    """Run fn() and return (its output, the bytes autograd keeps for the backward): the activation
    memory a training step pays, counted tensor by tensor (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _timed(fn, repeat=3):
    import time
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class _Attention(nn.Module):
    """Causal multi-head attention of the same width, for comparison (attention.py has the real
    one; a leaf file does not import it). sdpa picks the fastest kernel torch has here."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, u, cache=None):
        q, k, v = self.qkv(u).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4)   # 3 x (b, h, T, d)
        if cache is not None:            # cache: [k, v], grown by one token per call
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        return self.out(y.transpose(1, 2).flatten(2))


def _demo(lengths=(512, 1024, 2048, 4096, 8192), contexts=(256, 1024, 4096, 16384), dim=256):
    torch.manual_seed(0)
    heads = dim // 64
    mamba = Mamba2(dim, n_heads=2 * heads, head_dim=64, d_state=64)
    attn = _Attention(dim, heads)
    print(f"one layer of width {dim} on this CPU, float32: Mamba-2 ({mamba.n_heads} heads of 64, state 64, "
          f"chunks of {mamba.chunk_size}) against causal attention ({heads} heads of 64, torch's sdpa)")
    print("training (forward + backward of one sequence): time, and the activation bytes kept for the backward")
    print(f"  {'T':>6s} {'Mamba-2 ms':>11s} {'attention ms':>13s} {'ratio':>6s} {'Mamba-2 MB':>11s} {'attention MB':>13s}")
    for T in lengths:
        u = torch.randn(1, T, dim, requires_grad=True)
        row = []
        for layer in (mamba, attn):
            y, saved = _saved_bytes(lambda: layer(u))
            y.sum().backward()
            row.append((_timed(lambda: layer(u).sum().backward()), saved))
        (tm, mm), (ta, ma) = row
        print(f"  {T:6d} {1e3 * tm:11.1f} {1e3 * ta:13.1f} {ta / tm:6.2f} {mm / 2**20:11.1f} {ma / 2**20:13.1f}")
    print("  (time: Mamba-2's grows as T, attention's as T^2, so the ratio grows with T. Memory: both linear.\n"
          "   sdpa's CPU kernel is a flash kernel that keeps O(T) for the backward; this PyTorch chunked scan keeps\n"
          "   its (L x L) decay and score matrices, T x L numbers per head, a constant factor the kernels avoid.)")

    print("decoding one token after a context of C tokens: time, and the cache the layer carries")
    print(f"  {'C':>6s} {'Mamba-2 us':>11s} {'attention us':>13s} {'Mamba-2 cache':>14s} {'KV cache':>10s}")
    with torch.no_grad():
        for C in contexts:
            cache, kv = SSMCache(1), []
            mamba(torch.randn(1, C, dim), cache=cache, layer=0)        # prefill the state...
            attn(torch.randn(1, C, dim), cache=kv)                     # ... and the KV cache
            u = torch.randn(1, 1, dim)
            steps = 20
            tm = _timed(lambda: [mamba(u, cache=cache, layer=0) for _ in range(steps)]) / steps
            kv_bytes = sum(t.numel() * t.element_size() for t in kv)
            ta = _timed(lambda: [attn(u, cache=[t[:, :, :C] for t in kv]) for _ in range(steps)]) / steps
            print(f"  {C:6d} {1e6 * tm:11.0f} {1e6 * ta:13.0f} {cache.nbytes() / 2**10:11.0f} KB "
                  f"{kv_bytes / 2**20:7.1f} MB")
    print("  (Mamba-2's step and state do not depend on C; attention reads, and keeps, every earlier token)")


if __name__ == "__main__":
    _demo()

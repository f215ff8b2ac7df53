"""
attention.py: attention and position encodings for a modern decoder.

The concept. Attention lets each token read from the tokens before it: queries meet keys
(a softmax over their dot products) and take a weighted sum of values. Everything around
that core is a trade of memory for quality:
- MHA gives every query head its own key/value head; GQA shares each K/V head between a
  group of query heads (n_head / n_kv_head of them), MQA shares one K/V head between all.
  The KV cache, which dominates memory when generating, shrinks by the group size.
- MLA (DeepSeek-V2/V3) caches one small latent vector per token instead: every head's keys
  and values are re-projected from it, and RoPE rides in a few extra dimensions whose key is
  shared by all heads. When decoding, the up-projections fold into the query and the output,
  so attention reads the latents directly: a cache smaller than GQA's, with all heads distinct.
- Positions: RoPE rotates each (q, k) pair of dimensions by an angle proportional to the
  token's position, so their dot product depends only on the distance between tokens.
  Partial RoPE rotates only a fraction of each head's dimensions. NoPE rotates nothing and
  lets the causal mask alone carry order; RNoPE alternates the two across layers (SmolLM3
  drops RoPE from every fourth layer), which helps long contexts. Context extension raises
  rope_theta (ABF) or rescales the frequencies (Llama 3 and YaRN: slow-rotating dimensions
  are interpolated, fast ones kept; YaRN also sharpens attention by a temperature).
- QK-norm (Qwen3, OLMo 2) RMS-normalises each head's q and k, which keeps attention logits
  from growing without bound and stabilises training.
- Packed training sequences hold several documents: intra-document masking lets a token see
  only its own document. Here a document starts wherever `position_ids` restart at 0.
- Flash attention computes the same thing without ever writing the (T x T) scores to GPU
  memory: tiles of queries and keys meet in on-chip SRAM and the softmax is computed online.
  Here it is a Triton kernel (forward and backward) that also skips every tile of keys that a
  document boundary masks out, so packed documents cost attention over their own length only.

The playbook's lessons: GQA matches MHA's quality at a fraction of its KV cache (SmolLM3 uses
4 K/V heads for 16 query heads); test attention choices at small scale before trusting
them; intra-document masking costs nothing at short context and matters for long-context
training; NoPE layers mixed with RoPE layers extend better.

Papers: Vaswani et al. 2017 (attention); Shazeer 2019 (MQA); Ainslie et al. 2023 (GQA);
DeepSeek-AI 2024 (DeepSeek-V2: MLA); Su et al. 2021 (RoPE); Kazemnejad et al. 2023 and
Yang et al. 2025 (NoPE, RNoPE); Xiong et al. 2023 (ABF); Peng et al. 2023 (YaRN);
Grattafiori et al. 2024 (Llama 3, its RoPE scaling); Dehghani et al. 2023, Team OLMo 2024
(QK-norm); Zhao et al. 2024 (intra-document masking); Dao et al. 2022, Dao 2023
(FlashAttention, FlashAttention-2); Milakov & Gimelshein 2018 (online softmax).

Run:
    python attention.py        # KV-cache bytes per token for MHA/GQA/MQA/MLA; cached decoding == full
                               # forward; the attention work that document masking lets flash skip

Status: MHA/MQA/GQA, MLA (naive and absorbed), RoPE (default, partial, Llama 3, YaRN, ABF via
rope_theta), NoPE, QK-norm, document masking, eager, sdpa and the Triton flash kernel (tested
under Triton's interpreter), the KV cache.
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
    """Whether the Triton kernels run for tensor t: on CUDA, when Triton is installed, unless
    the environment says NANOPLAYBOOK_KERNELS=0 (to rule the kernels out when debugging).
    The tests turn them on for CPU tensors under Triton's interpreter."""
    return triton is not None and t.is_cuda and os.environ.get("NANOPLAYBOOK_KERNELS", "1") != "0"


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (the mean of squares loses precision in bf16)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


# -----------------------------------------------------------------------------
# Positions: RoPE and its extensions

def rope_inv_freq(rotary_dim, theta=10000.0, scaling=None):
    """The rotation speed of each pair of dimensions, and the attention factor (YaRN's
    temperature, 1 otherwise). `scaling` is Hugging Face's `rope_scaling` dict; supported:
    none / "default"; "llama3" (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings); "yarn" (factor, original_max_position_embeddings,
    beta_fast, beta_slow, attention_factor or mscale / mscale_all_dim, truncate)."""
    if rotary_dim % 2:
        raise ValueError(f"the rotated part of a head must have an even size, got {rotary_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "llama3":
        # Llama 3.1 (8k -> 128k): a pair's wavelength, 2pi / inv_freq tokens per turn, says
        # what it learned over the original context L. Wavelengths longer than L / low_freq_factor
        # never completed a turn there, so past L they would meet unseen angles: slow them down
        # by `factor` (interpolate). Wavelengths shorter than L / high_freq_factor turned many
        # times and carry local order: keep them. In between, blend linearly in L / wavelength
        # (turns over L). No temperature: the attention factor stays 1.
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        turns = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
        keep = ((turns - lo) / (hi - lo)).clamp(0, 1)
        return inv_freq / scaling["factor"] * (1 - keep) + inv_freq * keep, 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, llama3, yarn)")
    s, L = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    # Over the original context L, pair i turns L * inv_freq[i] / 2pi times. Pairs that turn
    # more than beta_fast times have seen every angle in training: keep them (extrapolate).
    # Pairs that turn fewer than beta_slow times would meet unseen angles past L: slow them
    # down by the factor s (interpolate). In between, a linear ramp over the pair index.
    def pair_index(turns):  # the (fractional) pair index that turns `turns` times over L
        return rotary_dim * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = pair_index(beta_fast), pair_index(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rotary_dim - 1)
    interpolate = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / s * interpolate + inv_freq * (1 - interpolate)

    # The temperature: stretched positions flatten attention; sqrt(1/t) = 0.1 ln(s) + 1
    # sharpens it back. It multiplies cos and sin, so q.k scales by its square.
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling.get("attention_factor")
    if factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        factor = mscale(s, m) / mscale(s, m_all) if m and m_all else mscale(s)
    return inv_freq, float(factor)


class Rotary(nn.Module):
    """cos and sin for every position: shared by all the layers that use RoPE."""

    def __init__(self, head_dim, theta=10000.0, partial_rotary_factor=1.0, scaling=None):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        inv_freq, self.attention_factor = rope_inv_freq(self.rotary_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        """position_ids (B, T) -> cos, sin (B, T, rotary_dim), in float32."""
        angles = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by the angles in cos/sin (B, T, R), R <= D. Dimension i is paired
    with i + R/2 (the "half" layout of Llama and Hugging Face, so weights copy over as they
    are); dimensions past R are left alone (partial RoPE)."""
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    x1, x2 = rot.chunk(2, dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


# -----------------------------------------------------------------------------
# Masks and the KV cache

class KVCache:
    """Keys and values of every layer for the tokens seen so far, (B, n_kv_head, S, D) each:
    stored once per K/V head, never copied per query head; an MLA layer keeps its latents in
    k and its rope keys in v. `doc` is each cached token's document id (-1 for padding),
    shared by all layers."""

    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.doc = None

    def __len__(self):
        return 0 if self.doc is None else self.doc.shape[1]

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def document_ids(position_ids, start=0):
    """Each token's document: a new one starts wherever position_ids is 0, counting from
    start + 1; a negative position marks padding and gets -1. (B, T) int64."""
    doc = start + (position_ids == 0).long().cumsum(1)
    return torch.where(position_ids < 0, torch.full_like(doc, -1), doc)


def attention_mask(position_ids, cache=None, flash=False):
    """The boolean mask (B, 1, T, S) of which keys each query may read: earlier or equal
    tokens of the same document. A document starts wherever position_ids is 0; a negative
    position marks padding (left-padded prompts), which no real token reads. Returns None
    when the plain causal mask is all that is needed (one document per row, no cache, no
    padding), so that sdpa can take its fastest path. With a cache, the new tokens' ids are
    appended to it here, once for all layers. flash=True (no cache): return position_ids
    themselves instead of the mask, for `flash_attention` to find the documents tile by tile."""
    past = None if cache is None or not len(cache) else cache.doc
    # New tokens continue the last cached document until a position restarts at 0.
    doc = document_ids(position_ids, 0 if past is None else past.max(1, keepdim=True).values.clamp(min=0))
    if cache is None and not (position_ids[:, 1:] == 0).any() and not (position_ids < 0).any():
        return None
    if flash and cache is None:
        return position_ids
    keys = doc if past is None else torch.cat([past, doc], dim=1)
    if cache is not None:
        cache.doc = keys
    T, S = doc.shape[1], keys.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=doc.device).tril(S - T)
    return (causal & (doc[:, :, None] == keys[:, None, :]))[:, None]


# -----------------------------------------------------------------------------
# Attention: MHA, GQA, MQA

def attend(q, k, v, mask=None, impl="sdpa"):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, T, D), k (B, Hkv, S, D) and v (B, Hkv, S, Dv),
    each K/V head serving H / Hkv query heads. mask: None (causal) or boolean (B, 1, T, S), or
    for impl="triton" also the position_ids (B, T) from attention_mask(..., flash=True).
    impl: "eager" (the reference below), "sdpa" (torch's fused kernels) or "triton" (this
    file's flash_attention; with a cache, where T != S, sdpa)."""
    if impl == "triton":
        if (mask is None or mask.dtype != torch.bool) and q.shape[2] == k.shape[2]:
            return flash_attention(q, k, v, position_ids=mask)
        impl = "sdpa"
    if impl == "sdpa":
        if mask is None and q.shape[2] != k.shape[2]:  # sdpa's is_causal aligns top-left; a cache needs bottom-right
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if impl != "eager":
        raise ValueError(f"attention impl must be 'eager', 'sdpa' or 'triton', not {impl!r}")
    # The readable reference. Query heads are grouped by the K/V head they share, so K and V
    # broadcast over the group instead of being repeated.
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, T, D)
    scores = (qg @ k[:, :, None].transpose(-1, -2)).float() / math.sqrt(D)   # (B, Hkv, G, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~(mask[:, :, None] if mask.dim() == 4 else mask), float("-inf"))
    weights = scores.softmax(dim=-1).to(v.dtype)
    return (weights @ v[:, :, None]).view(B, H, T, v.shape[-1])


class Attention(nn.Module):
    """Multi-head attention with n_kv_head <= n_head K/V heads: MHA (equal), GQA, MQA (one).
    Optional biases on q/k/v (Qwen2) and QK-norm (Qwen3, OLMo 2). Whether a layer uses RoPE
    is decided by what it is given: cos/sin, or None (NoPE)."""

    def __init__(self, dim, n_head, n_kv_head=None, head_dim=None, bias=False, qk_norm=False, norm_eps=1e-6,
                 impl="sdpa"):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.impl = n_head, n_kv_head, impl
        self.head_dim = head_dim or dim // n_head
        self.q_proj = nn.Linear(dim, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def forward(self, x, rope=None, mask=None, cache=None, layer=0):
        """x (B, T, dim); rope: (cos, sin) from Rotary, or None; mask from attention_mask."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # before the rotation, as Qwen3 does
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, mask, self.impl)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def kv_bytes_per_token(n_layers, n_kv_head, head_dim, bytes_per_value=2):
    """What the cache holds for one token: K and V, for every layer and K/V head."""
    return 2 * n_layers * n_kv_head * head_dim * bytes_per_value


# -----------------------------------------------------------------------------
# MLA: multi-head latent attention (DeepSeek-V2/V3)

class MLA(nn.Module):
    """Keys and values of all heads are re-projected from one small latent per token, which is
    all the cache keeps, with one RoPE key shared by all heads beside it. Parameter names are
    those of Hugging Face's DeepseekV3Attention, so weights copy over; q_lora_rank=None gives
    a plain q_proj (DeepSeek-V2-Lite), else q goes through its own low-rank bottleneck (V2, V3).

    RoPE uses this file's "half" layout (rope_interleave=False in Hugging Face's config).
    DeepSeek's released checkpoints rotate interleaved pairs (0,1),(2,3)...: the same rotation
    on a fixed permutation of each head's rope columns, so a loader permutes those rows of
    q_proj / q_b_proj and of kv_a_proj_with_mqa. YaRN with MLA is not supported here: DeepSeek
    also multiplies the softmax scale by mscale(factor, mscale_all_dim)^2, which Rotary's
    attention factor (it scales only the rope part of q.k) cannot express."""

    def __init__(self, dim, n_head, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                 v_head_dim=128, norm_eps=1e-6, impl="sdpa"):
        super().__init__()
        self.n_head, self.impl, self.q_lora_rank, self.kv_lora_rank = n_head, impl, q_lora_rank, kv_lora_rank
        self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim = qk_rope_head_dim, qk_nope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, n_head * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_head * qk_head_dim, bias=False)
        # Down-projection to the latent c_kv, plus the shared rope key (MQA-like: one head).
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        # Up-projection: per head, W_UK (the keys' non-rope part) and W_UV (the values).
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_head * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_head * v_head_dim, dim, bias=False)
        self.scale = qk_head_dim ** -0.5

    def forward(self, x, rope=None, mask=None, cache=None, layer=0, absorb=None):
        """x (B, T, dim); rope: (cos, sin) from Rotary(qk_rope_head_dim), or None; mask from
        attention_mask. cache.k[layer] holds the latents (B, 1, S, kv_lora_rank), cache.v[layer]
        the rotated rope keys (B, 1, S, qk_rope_head_dim). absorb: None picks the absorbed path
        when the cache already holds tokens (decoding), the naive one otherwise."""
        B, T, _ = x.shape
        H, Dn, Dr, Dv, r = self.n_head, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, H, Dn + Dr).transpose(1, 2).split([Dn, Dr], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([r, Dr], dim=-1)
        latent, k_pe = self.kv_a_layernorm(latent)[:, None], k_pe[:, None]  # (B, 1, T, .): shared by all heads
        # RoPE cannot pass through kv_b_proj (a rotation depends on position, the up-projection
        # must not), so position rides in these few decoupled dimensions only.
        if rope is not None:
            q_pe, k_pe = apply_rope(q_pe, *rope), apply_rope(k_pe, *rope)
        if absorb is None:
            absorb = cache is not None and cache.k[layer] is not None
        if cache is not None:
            latent, k_pe = cache.update(layer, latent, k_pe)
        S = latent.shape[2]
        if not absorb:
            # Naive (training, prefill): expand every head's keys and values from the latents,
            # then ordinary attention. With T ~ S, that costs less compute than absorbing.
            kv = self.kv_b_proj(latent[:, 0]).view(B, S, H, Dn + Dv).transpose(1, 2)
            k_nope, v = kv.split([Dn, Dv], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(B, H, S, Dr)], dim=-1)
            y = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, mask, self.impl)
        else:
            # Absorbed (decoding): q_nope . (W_UK c) = (W_UK^T q_nope) . c, so fold W_UK into the
            # query and attend to the latents themselves; the weighted sum of latents goes through
            # W_UV afterwards. Per-head keys and values never exist: a decode step reads only the
            # cache, (kv_lora_rank + qk_rope_head_dim) values per token and layer instead of
            # 2 * H * head_dim, and decoding is bound by memory reads, not FLOPs. The price is
            # compute: every query now works in kv_lora_rank dimensions, which is why prefill
            # (many queries) stays naive. (This is MQA with one head of size r + Dr whose values
            # are the latent: how FlashMLA runs it.)
            w_uk, w_uv = self.kv_b_proj.weight.view(H, Dn + Dv, r).split([Dn, Dv], dim=1)
            q_latent = q_nope @ w_uk                                                    # (B, H, T, r)
            scores = (q_latent @ latent.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)).float() * self.scale
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(latent.dtype)
            y = (weights @ latent) @ w_uv.transpose(1, 2)                               # (B, H, T, Dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dv))


def mla_bytes_per_token(n_layers, kv_lora_rank, qk_rope_head_dim, bytes_per_value=2):
    """What an MLA cache holds for one token: the latent and the shared rope key, per layer."""
    return n_layers * (kv_lora_rank + qk_rope_head_dim) * bytes_per_value


# -----------------------------------------------------------------------------
# Flash attention: a Triton kernel (CUDA)
#
# `attend` writes the (T x S) matrix of scores to GPU memory, reads it back for the softmax,
# writes the weights, and reads them again for the sum of values: O(T^2) bytes moved for
# O(T^2 D) FLOPs, so at D = 64..128 the GPU waits on memory. Flash attention (Dao et al. 2022,
# 2023) never writes the scores. One program owns a tile of BLOCK_M queries, keeps it in SRAM
# (registers and shared memory), and walks over the keys BLOCK_N at a time; the softmax is
# computed online: a running max m and a running sum l per query, and whenever a new tile
# raises the max, what was accumulated so far is rescaled by exp(m_old - m_new). Memory
# traffic falls to O(T D) per query tile, and the only thing saved for the backward pass is
# one number per query, the log-sum-exp (lse), from which any tile of softmax weights can be
# recomputed: p = exp(s - lse).
#
# Backward (FlashAttention-2's split): with delta_i = sum_d dO_id O_id = sum_j p_ij dp_ij,
#     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = dS K scale,   dK = dS^T Q scale.
# One kernel owns a tile of keys and loops over queries (dK, dV accumulate in registers,
# over every query head of its GQA group, so K/V are never repeated and nothing is summed
# afterwards); a second owns a tile of queries and loops over keys (dQ). Each recomputes P;
# neither needs atomics. The dQ kernel runs first and computes delta for its queries on the
# way (it loads their dO anyway), so delta never costs a pass of its own over dO and O.
#
# Documents. A packed row holds several documents; a query reads only keys of its own one.
# With `position_ids` the kernels get each token's document id and the span [first, last)
# of its document. Every tile of keys outside the spans of a query tile is skipped without
# being loaded: with documents of length L the work is O(T L), not O(T^2), which a dense
# boolean mask given to SDPA can never exploit.
#
# Softmax in base 2: exp(x) = exp2(x log2 e), and exp2 is one instruction on the GPU, so
# the scores are scaled by scale * log2(e) once and lse is kept in base 2.

# Launch settings of each kernel: its tile (BLOCK_M queries x BLOCK_N keys), warps and
# software-pipelining stages. "small": 16-bit inputs with head dims up to 128; "big": float32
# or wider heads (MLA's 192), whose tiles take twice the registers and shared memory. Chosen
# on an H100 with `python bench.py tune` (BENCHMARKS.md); the tests shrink every tile to 16.
FLASH_TILES = {
    "small": {"fwd": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              "dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
              "dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)},
    "big": {"fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
            "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
            "dkdv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)},
}


def flash_launch(dtype, head_dim):
    """The three kernels' launch settings for inputs of this dtype and (largest) head dim."""
    return FLASH_TILES["small" if dtype != torch.float32 and head_dim <= 128 else "big"]

if triton is not None:
    @triton.jit
    def _flash_fwd(Q, K, V, O, LSE, DOC, FIRST, LAST,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                   H, G, T, D, DV, qk_scale,
                   CAUSAL: tl.constexpr, DOCS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        pid, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H     # int64: b * stride passes 2^31 at long contexts
        hk = h // G                                   # the K/V head this query head shares
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        d, dv = tl.arange(0, BD), tl.arange(0, BDV)   # head dims padded to a power of 2, masked
        row_ok = rows < T
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :],
                    mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        lo, hi = 0, T
        if CAUSAL:
            hi = tl.minimum(T, (pid + 1) * BLOCK_M)
        if DOCS:
            doc_q = tl.load(DOC + b * T + rows, mask=row_ok, other=-2)
            lo = tl.min(tl.load(FIRST + b * T + rows, mask=row_ok, other=T), 0) // BLOCK_N * BLOCK_N
            hi = tl.minimum(hi, tl.max(tl.load(LAST + b * T + rows, mask=row_ok, other=0), 0))
        # Finite start for the running max: a row that has seen only masked keys then gets
        # exp2(-inf - m) = 0 instead of exp2(-inf + inf) = NaN.
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BDV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            kt = tl.load(K + b * skb + hk * skh + cols[None, :] * skt + d[:, None],
                         mask=col_ok[None, :] & (d < D)[:, None], other=0.0)        # (BD, BLOCK_N)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (rows[:, None] >= cols[None, :])
            if DOCS:
                ok = ok & (doc_q[:, None] == tl.load(DOC + b * T + cols, mask=col_ok, other=-3)[None, :])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)                # rescales what was summed under the old max
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + dv[None, :],
                        mask=col_ok[:, None] & (dv < DV)[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        l = tl.where(l > 0, l, 1.0)                   # only tail rows (>= T), never stored, have l = 0
        tl.store(O + b * sob + h * soh + rows[:, None] * sot + dv[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < DV)[None, :])
        tl.store(LSE + bh * T + rows, m + tl.log2(l), mask=row_ok)

    @triton.jit
    def _flash_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, DOC, FIRST, LAST,
                      sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                      H, G, T, D, DV, qk_scale, scale,
                      CAUSAL: tl.constexpr, DOCS: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        # The forward's loop again, with p recomputed from lse: dQ = sum over key tiles of dS K.
        # First, delta = rowsum(dO * O) = sum_j p_ij dp_ij for this tile's queries: dS needs it
        # here, and the dK/dV kernel, launched after this one, reads it from DELTA.
        pid, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H     # int64: b * stride passes 2^31 at long contexts
        hk = h // G
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        d, dv = tl.arange(0, BD), tl.arange(0, BDV)
        row_ok = rows < T
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :],
                    mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        do = tl.load(DO + b * sob + h * soh + rows[:, None] * sot + dv[None, :],
                     mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
        o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + dv[None, :],
                    mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + bh * T + rows, delta, mask=row_ok)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        lo, hi = 0, T
        if CAUSAL:
            hi = tl.minimum(T, (pid + 1) * BLOCK_M)
        if DOCS:
            doc_q = tl.load(DOC + b * T + rows, mask=row_ok, other=-2)
            lo = tl.min(tl.load(FIRST + b * T + rows, mask=row_ok, other=T), 0) // BLOCK_N * BLOCK_N
            hi = tl.minimum(hi, tl.max(tl.load(LAST + b * T + rows, mask=row_ok, other=0), 0))
        dq = tl.zeros([BLOCK_M, BD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            kt = tl.load(K + b * skb + hk * skh + cols[None, :] * skt + d[:, None],
                         mask=col_ok[None, :] & (d < D)[:, None], other=0.0)        # (BD, BLOCK_N)
            vt = tl.load(V + b * svb + hk * svh + cols[None, :] * svt + dv[:, None],
                         mask=col_ok[None, :] & (dv < DV)[:, None], other=0.0)      # (BDV, BLOCK_N)
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (rows[:, None] >= cols[None, :])
            if DOCS:
                ok = ok & (doc_q[:, None] == tl.load(DOC + b * T + cols, mask=col_ok, other=-3)[None, :])
            p = tl.where(ok, tl.exp2(tl.dot(q, kt, input_precision=PREC) * qk_scale - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, vt, input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
        tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (d < D)[None, :])

    @triton.jit
    def _flash_bwd_dkdv(Q, K, V, DO, DK, DV_, LSE, DELTA, DOC, FIRST, LAST,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                        H, G, T, D, DV, qk_scale, scale,
                        CAUSAL: tl.constexpr, DOCS: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        # One tile of keys of one K/V head; every query of every head in its group reads it.
        # Everything is computed transposed (keys along rows) so that no tile needs a transpose
        # before its dot: sT = K Q^T, dV += P^T dO, dK += dS^T Q.
        pid, bhk = tl.program_id(0), tl.program_id(1)
        b, hk = (bhk // (H // G)).to(tl.int64), bhk % (H // G)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        d, dv = tl.arange(0, BD), tl.arange(0, BDV)
        col_ok = cols < T
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skt + d[None, :],
                    mask=col_ok[:, None] & (d < D)[None, :], other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + dv[None, :],
                    mask=col_ok[:, None] & (dv < DV)[None, :], other=0.0)
        lo, hi = 0, T
        if CAUSAL:                                    # queries before this tile never read it
            lo = pid * BLOCK_N // BLOCK_M * BLOCK_M
        if DOCS:
            doc_k = tl.load(DOC + b * T + cols, mask=col_ok, other=-3)
            first = tl.min(tl.load(FIRST + b * T + cols, mask=col_ok, other=T), 0) // BLOCK_M * BLOCK_M
            lo = tl.maximum(lo, first)
            hi = tl.max(tl.load(LAST + b * T + cols, mask=col_ok, other=0), 0)
        dk = tl.zeros([BLOCK_N, BD], tl.float32)
        dvacc = tl.zeros([BLOCK_N, BDV], tl.float32)
        for g in range(G):
            h = hk * G + g
            for start in range(lo, hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < T
                q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :],
                            mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
                do = tl.load(DO + b * sob + h * soh + rows[:, None] * sot + dv[None, :],
                             mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
                lse = tl.load(LSE + (b * H + h) * T + rows, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + (b * H + h) * T + rows, mask=row_ok, other=0.0)
                ok = col_ok[:, None] & row_ok[None, :]
                if CAUSAL:
                    ok = ok & (rows[None, :] >= cols[:, None])
                if DOCS:
                    ok = ok & (doc_k[:, None] == tl.load(DOC + b * T + rows, mask=row_ok, other=-2)[None, :])
                pt = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :]), 0.0)
                dvacc += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
                dst = pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        tl.store(DK + b * skb + hk * skh + cols[:, None] * skt + d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=col_ok[:, None] & (d < D)[None, :])
        tl.store(DV_ + b * svb + hk * svh + cols[:, None] * svt + dv[None, :], dvacc.to(DV_.dtype.element_ty),
                 mask=col_ok[:, None] & (dv < DV)[None, :])


def document_spans(position_ids):
    """For each token: its document id (as attention_mask numbers them; -1 for padding) and
    the span [first, last) of the tokens that share that id, all int32 (B, T)."""
    doc = document_ids(position_ids)
    B, T = doc.shape
    idx = torch.arange(T, device=doc.device).expand(B, T)
    slot = doc + 1                                  # ids run from -1 to T
    first = torch.full((B, T + 2), T, device=doc.device).scatter_reduce(1, slot, idx, "amin")
    last = torch.zeros((B, T + 2), dtype=torch.long, device=doc.device).scatter_reduce(1, slot, idx + 1, "amax")
    return [t.to(torch.int32).contiguous() for t in (doc, first.gather(1, slot), last.gather(1, slot))]


def _dense(t):
    """t itself when its elements tile memory without gaps, in any order of dims (then
    empty_like copies its strides, and one set of strides serves t and its gradient: the
    kernels take the model's (B, T, H, D) memory order as it comes); else a contiguous copy."""
    return t if t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride() else t.contiguous()


class FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, position_ids, causal):
        B, H, T, D = q.shape
        Hkv, DV = k.shape[1], v.shape[-1]
        q, k, v = _dense(q), _dense(k), _dense(v)
        o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device).transpose(1, 2)  # the model's order
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        docs = (document_spans(position_ids) if position_ids is not None
                else [torch.zeros(1, dtype=torch.int32, device=q.device)] * 3)   # unread
        ctx.meta = dict(H=H, G=H // Hkv, T=T, D=D, DV=DV, qk_scale=D ** -0.5 * 1.4426950408889634,
                        CAUSAL=bool(causal), DOCS=position_ids is not None,
                        PREC="ieee" if q.dtype == torch.float32 else "tf32",
                        BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(DV)))
        ctx.launch = launch = flash_launch(q.dtype, max(D, DV))
        _flash_fwd[(triton.cdiv(T, launch["fwd"]["BLOCK_M"]), B * H)](
            q, k, v, o, lse, *docs, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            **ctx.meta, **launch["fwd"])
        ctx.save_for_backward(q, k, v, o, lse, *docs)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *docs = ctx.saved_tensors
        B, H, T, _ = q.shape
        do = torch.empty_like(o).copy_(do) if do.stride() != o.stride() else do   # o's strides serve dO
        delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)   # written by the dQ kernel
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = dict(ctx.meta, scale=q.shape[-1] ** -0.5)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
        dq_launch, dkdv_launch = ctx.launch["dq"], ctx.launch["dkdv"]
        _flash_bwd_dq[(triton.cdiv(T, dq_launch["BLOCK_M"]), B * H)](
            q, k, v, o, do, dq, lse, delta, *docs, *strides, **meta, **dq_launch)
        _flash_bwd_dkdv[(triton.cdiv(T, dkdv_launch["BLOCK_N"]), B * k.shape[1])](
            q, k, v, do, dk, dv, lse, delta, *docs, *strides, **meta, **dkdv_launch)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, position_ids=None, causal=True):
    """softmax(q k^T / sqrt(D) + mask) v without the (T x T) matrix: q (B, H, T, D), k (B, Hkv, T, D),
    v (B, Hkv, T, Dv), H a multiple of Hkv. The mask: causal (or not), and, given position_ids
    (B, T), only keys of the query's own document (a document starts where positions restart
    at 0; negative positions are padding). The Triton kernels run where `kernels_on` says so
    (CUDA); elsewhere the same attention is computed by `attend` with a dense mask."""
    B, H, T, D = q.shape
    if k.shape[:3] != (B, k.shape[1], T) or v.shape[:3] != k.shape[:3] or k.shape[-1] != D or H % k.shape[1]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "want q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) with H a multiple of Hkv")
    if position_ids is not None and position_ids.shape != (B, T):
        raise ValueError(f"flash_attention: position_ids {tuple(position_ids.shape)}, want (B, T) = {(B, T)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype, not {q.dtype}, {k.dtype}, {v.dtype}")
    if max(D, v.shape[-1]) > 256:
        raise ValueError(f"flash_attention: head dims up to 256, not {max(D, v.shape[-1])}")
    if kernels_on(q):
        return FlashAttention.apply(q, k, v, position_ids, causal)
    if position_ids is None and causal:
        return attend(q, k, v, None, "sdpa")
    mask = torch.ones(1, T, T, dtype=torch.bool, device=q.device)
    mask = mask.tril() if causal else mask
    if position_ids is not None:
        doc = document_ids(position_ids)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return attend(q, k, v, mask[:, None], "sdpa")


def _demo():
    torch.manual_seed(0)
    L, dim, H, D = 36, 2048, 16, 128  # SmolLM3-3B's shape
    print(f"KV cache per token at SmolLM3-3B's shape ({L} layers, {H} query heads of {D}), bf16:")
    # MLA with DeepSeek-V2-Lite's attention (same dim and heads): no q bottleneck (q_lora_rank
    # None), latent 512, rope 64, nope 128, values 128. Parameters counted on the meta device.
    mla_kw = dict(q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    with torch.device("meta"):
        rows = [(name, kv_bytes_per_token(L, kv, D), Attention(dim, H, kv, D))
                for name, kv in [("MHA", 16), ("GQA (SmolLM3: 4)", 4), ("MQA", 1)]]
        rows.append(("MLA (latent 512+64)", mla_bytes_per_token(L, 512, 64), MLA(dim, H, **mla_kw)))
    for name, per_token, layer in rows:
        attn_params = L * sum(p.numel() for p in layer.parameters())
        print(f"  {name:19s} {per_token / 1024:6.1f} KiB/token, {per_token * 65536 / 2 ** 30:5.1f} GiB at 64k tokens, "
              f"attention params {attn_params / 1e6:6.1f}M")
    print("\ncached decoding (prefill 6, then one token at a time) vs the full forward:")
    x = torch.randn(2, 12, 64)
    pos = torch.arange(12).expand(2, 12)
    tiny = [("GQA", Attention(64, 8, 2, qk_norm=True).eval(), Rotary(8, partial_rotary_factor=0.5)),
            ("MLA, absorbed", MLA(64, 4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                  v_head_dim=12).eval(), Rotary(8))]
    for name, attn, rotary in tiny:
        with torch.no_grad():
            full = attn(x, rotary(pos))
            cache, outs = KVCache(1), []
            for a, b in [(0, 6)] + [(t, t + 1) for t in range(6, 12)]:
                outs.append(attn(x[:, a:b], rotary(pos[:, a:b]), attention_mask(pos[:, a:b], cache), cache))
        print(f"  tiny {name:14s} max |difference| = {(torch.cat(outs, 1) - full).abs().max():.2e}, "
              f"cache {cache.nbytes() // (2 * 12)} bytes/token (fp32)")
    print("\nflash attention, tiles of 64 x 64 visited out of a 4096-token causal row:")
    for name, lengths in [("one document", [4096]), ("documents of 512", [512] * 8),
                          ("documents of 64..1024", torch.randint(64, 1025, (40,)).tolist())]:
        pos = torch.cat([torch.arange(n) for n in lengths])[None, :4096]
        print(f"  {name:22s} {flash_tiles(pos):6,d} of {flash_tiles(torch.arange(4096)[None]):,d}")
    if kernels_on(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")):
        q, k, v = (torch.randn(2, 8, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        pos = torch.cat([torch.arange(300), torch.arange(700)]).expand(2, 1000).cuda()
        diff = (flash_attention(q, k, v, pos).float() - flash_attention(q.cpu().float(), k.cpu().float(),
                                                                        v.cpu().float(), pos.cpu()).cuda()).abs().max()
        print(f"  the kernel on {torch.cuda.get_device_name()}, bf16, vs the dense float32 reference: "
              f"max |difference| = {diff:.2e}")


def flash_tiles(position_ids, block_m=64, block_n=64):
    """How many (query tile, key tile) pairs the causal flash kernel visits for row 0: the
    same bounds as _flash_fwd (from the first token of the tile's first document to the
    diagonal), counted here in Python."""
    _, first, _ = document_spans(position_ids[:1])
    T = position_ids.shape[1]
    return sum(-(-min(T, m + block_m) // block_n) - first[0, m].item() // block_n for m in range(0, T, block_m))


if __name__ == "__main__":
    _demo()

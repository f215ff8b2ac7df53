"""
model.py: the modern decoder that every stage of nanoplaybook trains.

The concept. A decoder-only transformer: token embeddings, a stack of pre-norm blocks
(RMSNorm -> attention -> residual add, RMSNorm -> SwiGLU MLP -> residual add), a final
RMSNorm and a linear head back to the vocabulary. Everything that makes it "modern" is a
choice the playbook's architecture chapter weighs: GQA or MLA (attention.py), RoPE / NoPE /
learned positions, tied embeddings, QK-norm, z-loss, the initialisation. One dataclass,
`ModelConfig`, holds every choice, and presets give published models their exact shapes.

The playbook's lessons, as they show up here:
- Small models spend a large share of their parameters on the embedding: tie it to the
  head (SmolLM2/3 do), and pad the vocabulary to a multiple of 128 so the head's matmul
  tiles well on GPUs.
- Initialise with N(0, std) and shrink the residual projections (o_proj, down_proj) by
  1/sqrt(2 * n_layer), so the residual stream does not grow with depth (GPT-2).
- z-loss (PaLM) penalises log(sum(exp(logits)))^2 and keeps the output logits from
  drifting, one of the cheap stability tricks.
- Measure throughput in FLOPs: `flops_per_token` gives 6N plus attention, the number MFU
  divides by.
- Start from and give back real checkpoints: `from_pretrained` / `save_pretrained` speak
  Hugging Face's format for Llama, SmolLM2, SmolLM3, Qwen2, Qwen3, Qwen3-MoE, DeepSeek-V3,
  Mamba2 and Bamba.
- Hybrids: `mixers` says which layers are attention and which are Mamba-2 (ssm.py), as
  Nemotron-H and Jamba mix them; `ffns` may drop a layer's MLP (pure Mamba-2 has none).

The loss never holds the whole (tokens x vocabulary) float32 logit matrix: it walks over
chunks of tokens and computes each chunk's gradient right away (the "fused linear
cross-entropy" idea of Liger Kernel and Cut Cross-Entropy, here in plain PyTorch). On CUDA,
two Triton kernels take over (`kernels_on`): RMSNorm (one read and one write per row, forward
and backward), and each chunk's cross-entropy (an online logsumexp over vocabulary tiles, so
the fp32 softmax is never materialised; the gradient overwrites the logits in place). Their
PyTorch references stay beside them; the tests run the kernels under Triton's interpreter.
Attention's own kernel (flash attention, with document masking) lives in attention.py and is
the default `attn_impl` ("triton"); it, too, runs only on CUDA, sdpa elsewhere.

Papers: Vaswani et al. 2017; Radford et al. 2019 (GPT-2 init); Zhang & Sennrich 2019
(RMSNorm); Shazeer 2020 (SwiGLU); Press & Wolf 2017 (tied embeddings); Chowdhery et al.
2022 (PaLM: z-loss, FLOPs accounting); Touvron et al. 2023 (Llama); Wijmans et al. 2024
(Cut Cross-Entropy); Hugging Face 2025 (SmolLM3).

Run:
    python model.py        # preset sizes and FLOPs per token, and a sample from a random tiny model
"""

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn

import attention
import moe
import ssm
from attention import MLA, Attention, KVCache, Rotary, attention_mask, kernels_on

try:
    import triton
    import triton.language as tl
except ImportError:     # macOS, or a CPU-only install: the PyTorch references run
    triton = None


# -----------------------------------------------------------------------------
# Configuration and presets

@dataclass
class ModelConfig:
    vocab_size: int = 4096          # the tokenizer's vocabulary
    vocab_multiple: int = 128       # the embedding is padded to a multiple of this
    n_layer: int = 6
    dim: int = 256
    n_head: int = 4
    n_kv_head: int = 2              # n_head: MHA, 1: MQA, in between: GQA
    head_dim: int | None = None     # default dim // n_head
    mlp_dim: int = 768              # SwiGLU's hidden width
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 1024
    # positions: "rope" (rotary, in attention), "learned" (absolute, added to the embedding), "none"
    positions: str = "rope"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict | None = None    # Hugging Face's rope_scaling: {"rope_type": "yarn"|"llama3", ...}
    nope_layers: tuple = ()             # layers that skip RoPE (RNoPE; SmolLM3: every 4th)
    qk_norm: bool = False
    attn_bias: bool = False             # biases on q/k/v (Qwen2)
    attention: str = "gqa"              # "gqa" (covers MHA and MQA) or "mla"
    q_lora_rank: int | None = None      # MLA's dimensions (DeepSeek-V2/V3)
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    attn_impl: str = "triton"           # "triton" (flash kernel on CUDA, sdpa elsewhere), "sdpa", "eager"
    z_loss: float = 0.0
    init_std: float = 0.02
    # Per-layer pattern, one entry per layer. mixers: "attention" or "ssm" (Mamba-2), or a string
    # of letters, A for attention and M for Mamba-2 ("MMMAMMMA", as Nemotron-H writes its
    # pattern); None: all attention. ffns: "dense", "moe" or "none" (no feed-forward sublayer,
    # as in pure Mamba-2 models); None: all "dense", or with n_experts > 0 the MoE layers that
    # moe_every and first_dense place.
    mixers: tuple | str | None = None
    ffns: tuple | None = None
    # Mixture of experts (moe.py). n_experts 0: a dense model.
    n_experts: int = 0
    top_k: int = 2                      # routed experts per token
    d_expert: int | None = None         # each expert's SwiGLU width (default mlp_dim)
    n_shared_experts: int = 0           # always-on experts (DeepSeek)
    router: str = "softmax"             # "softmax" (Qwen3-MoE, Mixtral) or "sigmoid" (DeepSeek-V3, with its selection bias)
    norm_topk_prob: bool = True         # renormalise the top-k weights to sum to 1
    routed_scaling: float = 1.0         # DeepSeek's routed_scaling_factor
    capacity_factor: float | None = None  # None: dropless
    moe_aux_loss: float = 0.0           # Switch/GShard balance loss coefficient (alpha), per MoE layer; each layer's
                                        # loss is 1 at perfect balance (Megatron's convention, not HF's: aux_coef_from_hf)
    router_z_loss: float = 0.0
    balance_stats: str = "global"       # the balance loss's f over the "global" batch or the "micro"-batch
    bias_update_rate: float = 0.0       # gamma of DeepSeek-V3's aux-loss-free bias update (sigmoid router)
    moe_every: int = 1                  # every k-th layer is MoE (Qwen's decoder_sparse_step) ...
    first_dense: int = 0                # ... after this many leading dense layers (DeepSeek: 3)
    moe_share: int = 1                  # consecutive MoE layers that share one expert bank
    n_group: int = 1                    # DeepSeek-V3's group-limited routing: experts in n_group groups,
    topk_group: int = 1                 # ... each token uses experts of topk_group of them
    # Mamba-2 layers (ssm.py), where mixers says "ssm"
    ssm_heads: int | None = None        # default 2 * dim // ssm_head_dim (Mamba-2's expand = 2)
    ssm_head_dim: int = 64              # P, channels per head
    ssm_state: int = 64                 # N, the state size per channel
    ssm_groups: int = 1                 # B/C groups (heads share them, as GQA's heads share K/V)
    ssm_conv: int = 4                   # causal convolution taps
    ssm_chunk: int = 64                 # L of the chunked scan: a speed knob, the function is the same
    ssm_conv_bias: bool = True
    ssm_proj_bias: bool = False

    def __post_init__(self):
        self.nope_layers = tuple(self.nope_layers)
        def bad(key, why):
            raise ValueError(f"ModelConfig.{key}: {why}")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            bad("n_kv_head", f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            if self.dim % self.n_head:
                bad("head_dim", f"dim ({self.dim}) is not divisible by n_head ({self.n_head}); set head_dim")
            self.head_dim = self.dim // self.n_head
        if self.positions not in ("rope", "learned", "none"):
            bad("positions", f"must be 'rope', 'learned' or 'none', not {self.positions!r}")
        if self.attn_impl not in ("triton", "sdpa", "eager"):
            bad("attn_impl", f"must be 'triton', 'sdpa' or 'eager', not {self.attn_impl!r}")
        if self.attention not in ("gqa", "mla"):
            bad("attention", f"must be 'gqa' or 'mla', not {self.attention!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if self.attention == "mla" and rope_type == "yarn":
            bad("rope_scaling", "yarn with attention='mla' is not supported (DeepSeek's YaRN also rescales the "
                                "softmax by mscale_all_dim, which MLA here does not)")
        if any(not 0 <= i < self.n_layer for i in self.nope_layers):
            bad("nope_layers", f"{self.nope_layers} holds a layer outside 0..{self.n_layer - 1}")
        if self.moe_every < 1 or self.first_dense < 0:
            bad("moe_every", f"moe_every ({self.moe_every}) must be >= 1 and first_dense ({self.first_dense}) >= 0")
        if self.bias_update_rate and self.router != "sigmoid":
            bad("bias_update_rate", "the bias update moves the sigmoid router's selection bias; set router='sigmoid'")
        if isinstance(self.mixers, str):
            letters = {"A": "attention", "M": "ssm"}
            if set(self.mixers) - set(letters):
                bad("mixers", f"a pattern string holds A (attention) and M (Mamba-2), got {self.mixers!r}")
            self.mixers = tuple(letters[ch] for ch in self.mixers)
        if self.ffns is None and self.n_experts:
            self.ffns = tuple("moe" if i >= self.first_dense and (i - self.first_dense + 1) % self.moe_every == 0
                              else "dense" for i in range(self.n_layer))
        for key, allowed in (("mixers", ("attention", "ssm")), ("ffns", ("dense", "moe", "none"))):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            setattr(self, key, tuple(pattern))
            if len(pattern) != self.n_layer:
                bad(key, f"has {len(pattern)} entries for {self.n_layer} layers")
            if any(p not in allowed for p in pattern):
                bad(key, f"layers may be {' or '.join(map(repr, allowed))}, got {sorted(set(pattern))}")
        if self.ffns and "moe" in self.ffns:
            if self.n_experts < 1:
                bad("n_experts", "MoE layers need n_experts >= 1")
            if not 1 <= self.top_k <= self.n_experts:
                bad("top_k", f"{self.top_k} must be between 1 and n_experts ({self.n_experts})")
            if self.router not in ("softmax", "sigmoid"):
                bad("router", f"must be 'softmax' or 'sigmoid', not {self.router!r}")
            if self.balance_stats not in ("global", "micro"):
                bad("balance_stats", f"must be 'global' or 'micro', not {self.balance_stats!r}")
            if self.moe_share < 1:
                bad("moe_share", "must be >= 1")
            if self.n_group < 1 or self.n_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                bad("n_group", f"n_group ({self.n_group}) must divide n_experts ({self.n_experts}) and "
                               f"topk_group ({self.topk_group}) lie in 1..n_group")
            if self.top_k > self.topk_group * (self.n_experts // self.n_group):
                bad("topk_group", f"top_k ({self.top_k}) experts do not fit in topk_group ({self.topk_group}) "
                                  f"groups of {self.n_experts // self.n_group}")

        if self.mixers and "ssm" in self.mixers:
            if self.ssm_heads is None:
                if 2 * self.dim % self.ssm_head_dim:
                    bad("ssm_heads", f"2 * dim ({2 * self.dim}) is not divisible by ssm_head_dim ({self.ssm_head_dim})")
                self.ssm_heads = 2 * self.dim // self.ssm_head_dim
            if self.ssm_heads % self.ssm_groups:
                bad("ssm_groups", f"ssm_heads ({self.ssm_heads}) must be divisible by ssm_groups ({self.ssm_groups})")
            if self.ssm_chunk < 1 or self.ssm_conv < 1:
                bad("ssm_chunk", f"ssm_chunk ({self.ssm_chunk}) and ssm_conv ({self.ssm_conv}) must be >= 1")

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


PRESETS = {
    # The CPU default: SmolLM3's recipe (GQA, RNoPE, tied) at a few million parameters.
    "tiny": dict(vocab_size=4096, n_layer=6, dim=256, n_head=4, n_kv_head=2, mlp_dim=768,
                 max_seq_len=1024, nope_layers=(3,)),
    "smollm2-135m": dict(vocab_size=49152, n_layer=30, dim=576, n_head=9, n_kv_head=3, mlp_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, init_std=0.041666666666666664),
    "smollm2-360m": dict(vocab_size=49152, n_layer=32, dim=960, n_head=15, n_kv_head=5, mlp_dim=2560,
                         rope_theta=100000.0, max_seq_len=8192),
    "smollm3-3b": dict(vocab_size=128256, n_layer=36, dim=2048, n_head=16, n_kv_head=4, mlp_dim=11008,
                       norm_eps=1e-6, rope_theta=5000000.0, max_seq_len=65536,
                       nope_layers=tuple(range(3, 36, 4))),
    # The playbook's ablation proxy.
    "llama3.2-1b": dict(vocab_size=128256, n_layer=16, dim=2048, n_head=32, n_kv_head=8, mlp_dim=8192,
                        rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def preset(name, **overrides):
    """ModelConfig of a preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# RMSNorm as a Triton kernel (CUDA). The reference is attention.RMSNorm: three elementwise
# passes and a reduction in eager PyTorch, each a round trip to GPU memory. The kernel reads
# each row once, keeps it in registers, and writes the result once: RMSNorm is memory-bound,
# so fewer passes is the whole win.

if triton is not None:
    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
        # one program per row; 1/rms is saved for the backward pass
        row = tl.program_id(0)
        base = row.to(tl.int64) * N    # int64: rows x N passes 2^31 on long batches
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW, N, n_rows, rows_per_program, BLOCK: tl.constexpr):
        # each program takes a block of rows and sums its share of dW in registers
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program   # int64, and so is row: row * N may pass 2^31
        for row in range(start, tl.minimum(start + rows_per_program, n_rows)):
            base = row * N
            x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            wdy = w * dy
            c = tl.sum(xhat * wdy, axis=0) / N
            tl.store(DX + base + cols, ((wdy - xhat * c) * rstd).to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW + pid * N + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight over the last dimension, by the kernels above. Backward, with
    xhat = x / rms(x): dx = (w dy - xhat * mean(xhat * w dy)) / rms(x), dw = sum over rows of
    dy * xhat (each program sums its block of rows; torch adds the blocks)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()
        y = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, N, eps, BLOCK=triton.next_power_of_2(N))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, N = x2.shape
        dx = torch.empty_like(x2)
        programs = min(n_rows, 256)
        dw = torch.empty(programs, N, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](dy.reshape(n_rows, N).contiguous(), x2, weight, rstd, dx, dw, N, n_rows,
                                   -(-n_rows // programs), BLOCK=triton.next_power_of_2(N))
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), None


class RMSNorm(attention.RMSNorm):
    """attention.py's RMSNorm (same parameters, same names), run by the Triton kernel on CUDA;
    elsewhere, or without Triton, the PyTorch reference."""

    def forward(self, x):
        if kernels_on(x):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


# -----------------------------------------------------------------------------
# The decoder

# The feed-forward sublayer, SwiGLU: down(silu(gate(x)) * up(x)). The gate gives each hidden
# unit a smooth, input-dependent on/off switch; it beats a plain GELU MLP at equal parameters.
# moe.py's experts are the same module, so it lives there.
MLP = moe.SwiGLU


class Block(nn.Module):
    """Pre-norm: normalise the input of each sublayer, never the residual stream itself,
    so gradients reach early layers through an untouched identity path. The sequence mixer is
    attention (self_attn) or Mamba-2 (mamba); the feed-forward is a SwiGLU, an MoE, or none."""

    def __init__(self, c, layer, experts=None):
        super().__init__()
        self.layer = layer
        self.use_rope = c.positions == "rope" and layer not in c.nope_layers
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = self.mamba = self.mlp = None
        if c.mixers is not None and c.mixers[layer] == "ssm":
            self.mamba = ssm.Mamba2(c.dim, c.ssm_heads, c.ssm_head_dim, c.ssm_state, c.ssm_groups, c.ssm_conv,
                                    c.ssm_chunk, c.ssm_conv_bias, c.ssm_proj_bias, c.norm_eps)
        elif c.attention == "mla":
            self.self_attn = MLA(c.dim, c.n_head, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim,
                                 c.qk_nope_head_dim, c.v_head_dim, c.norm_eps, c.attn_impl)
        else:
            self.self_attn = Attention(c.dim, c.n_head, c.n_kv_head, c.head_dim, c.attn_bias, c.qk_norm,
                                       c.norm_eps, c.attn_impl)
        if c.ffns is not None and c.ffns[layer] == "none":
            return
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        if c.ffns is not None and c.ffns[layer] == "moe":
            self.mlp = moe.MoE(c.dim, c.n_experts, c.top_k, c.d_expert or c.mlp_dim, c.n_shared_experts, c.router,
                               c.norm_topk_prob, c.routed_scaling, capacity_factor=c.capacity_factor,
                               aux_loss=c.moe_aux_loss, z_loss=c.router_z_loss,
                               global_stats=c.balance_stats == "global", experts=experts,
                               n_group=c.n_group, topk_group=c.topk_group)
        else:
            self.mlp = MLP(c.dim, c.mlp_dim)

    def forward(self, x, rope, mask, cache, reset):
        if self.mamba is not None:
            x = x + self.mamba(self.input_layernorm(x), reset, cache, self.layer)
        else:
            x = x + self.self_attn(self.input_layernorm(x), rope if self.use_rope else None, mask, cache, self.layer)
        return x if self.mlp is None else x + self.mlp(self.post_attention_layernorm(x))


class Cache(KVCache, ssm.SSMCache):
    """The decoding cache of any layer pattern: keys and values of attention layers (KVCache,
    growing with the context) and, for Mamba-2 layers, the convolution's last inputs and the
    SSM state (SSMCache, a fixed size). Each layer uses the half its mixer needs."""

    def __init__(self, n_layers):
        KVCache.__init__(self, n_layers)
        ssm.SSMCache.__init__(self, n_layers)

    def nbytes(self):
        return KVCache.nbytes(self) + ssm.SSMCache.nbytes(self)


class Model(nn.Module):
    """The decoder. Parameter names follow Hugging Face's Llama (embed_tokens, layers.N.self_attn.
    q_proj, ..., norm, lm_head), so checkpoints map over by a "model." prefix alone."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.padded_vocab, c.dim)
        self.embed_positions = nn.Embedding(c.max_seq_len, c.dim) if c.positions == "learned" else None
        rope_dim = c.qk_rope_head_dim if c.attention == "mla" else c.head_dim
        self.rotary = (Rotary(rope_dim, c.rope_theta, c.partial_rotary_factor, c.rope_scaling)
                       if c.positions == "rope" else None)
        self.layers = nn.ModuleList()
        bank, moe_seen = None, 0
        for i in range(c.n_layer):
            # moe_share > 1: each run of that many MoE layers reuses the first one's experts.
            self.layers.append(Block(c, i, bank if moe_seen % c.moe_share else None))
            if isinstance(self.layers[-1].mlp, moe.MoE):
                bank, moe_seen = self.layers[-1].mlp.experts, moe_seen + 1
        self.moe_layers = [b.mlp for b in self.layers if isinstance(b.mlp, moe.MoE)]
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.padded_vocab, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """N(0, init_std) for every matrix; residual projections (the last matmul before each
        residual add) get init_std / sqrt(2 n_layer): 2 n_layer of them add up in the stream."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj", "out_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)
        for block in self.layers:   # A, dt, D and the convolution have an SSM's own init
            if block.mamba is not None:
                block.mamba.reset_ssm_parameters()

    def block_inputs(self, position_ids, cache=None):
        """What every block takes beside x: (rope, mask, reset), all from the positions. A
        pipeline stage without the embedding (parallel.py) computes them from here."""
        # The flash kernel takes position_ids instead of a (T x T) mask and skips the tiles
        # that document boundaries mask out. With a cache, also records the new positions.
        flash = self.config.attn_impl == "triton" and kernels_on(position_ids)
        mask = attention_mask(position_ids, cache, flash)
        rope = self.rotary(position_ids) if self.rotary is not None else None
        reset = position_ids == 0     # where Mamba-2 layers restart their state from zero
        return rope, mask, reset

    def embed(self, input_ids, position_ids=None, cache=None):
        """The stack's input and what every block needs beside it: (x, rope, mask, reset).
        Split out of hidden_states so that a pipeline stage (parallel.py) can run its own
        slice of self.layers between this and head()."""
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"a sequence of {past + T} tokens is longer than max_seq_len="
                             f"{self.config.max_seq_len}; raise it (with RoPE, extend context by "
                             "rope_theta (ABF) or rope_scaling (YaRN) too)")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        rope, mask, reset = self.block_inputs(position_ids, cache)
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:          # padding (position < 0) reads position 0
            x = x + self.embed_positions(position_ids.clamp(min=0))
        return x, rope, mask, reset

    def hidden_states(self, input_ids, position_ids=None, cache=None):
        """The final normalised hidden states (B, T, dim), before the head."""
        x, rope, mask, reset = self.embed(input_ids, position_ids, cache)
        for block in self.layers:
            x = block(x, rope, mask, cache, reset)
        return self.norm(x)

    def forward(self, input_ids, labels=None, position_ids=None, cache=None, return_logits=None,
                log_probs=False, temperature=1.0, hidden=False):
        """Returns (logits, loss, aux). Without labels: logits (B, T, padded_vocab), loss None.
        With labels: the loss (mean cross-entropy over labels != -100, plus z_loss * mean
        logsumexp^2), computed chunk by chunk, and logits None unless return_logits=True.
        aux holds the detached terms for logging: "ce", "z_loss", and "row_ce", each sequence's
        mean cross-entropy (B,). With MoE layers the loss also holds their balancing terms
        (moe_aux_loss, router_z_loss), logged as "moe_loss", and aux["moe"] maps each MoE
        layer's index to its load statistics (min_load, max_load, load_entropy, dropped).
        log_probs=True: (None, None, aux) with aux["log_probs"], see log_probs(); through forward
        so that what wraps the model (DDP, ZeRO, FSDP2 gather weights in forward hooks) sees it.
        hidden=True: (None, None, {"hidden": the final hidden states (B, T, dim)}, with MoE
        layers their balancing terms) for a head of the caller's own (rl.py's reward model)."""
        h = self.hidden_states(input_ids, position_ids, cache)
        if hidden:
            aux = {"hidden": h}
            if self.moe_layers:
                aux["moe_loss"] = sum(m.loss for m in self.moe_layers)
            return None, None, aux
        if log_probs:
            return None, None, self.head_log_probs(h, labels, temperature)
        return self.head(h, labels, return_logits)

    def head(self, h, labels=None, return_logits=None):
        """forward's second half, from the final hidden states h (B, T, dim): see forward. A
        head module with its own loss() (parallel.py's vocabulary-parallel head, whose rows
        are spread over ranks) computes the cross-entropy itself."""
        if labels is None:
            return self.lm_head(h), None, {}
        logits = self.lm_head(h) if return_logits else None
        rows = (labels != -100).flatten().nonzero().squeeze(1)
        h_rows, y = h.flatten(0, 1).index_select(0, rows), labels.flatten()[rows]
        if hasattr(self.lm_head, "loss"):
            loss, token_ce, z = self.lm_head.loss(h_rows, y, float(self.config.z_loss))
        else:
            loss, token_ce, z = ChunkedCrossEntropy.apply(h_rows, self.lm_head.weight, y, float(self.config.z_loss),
                                                          torch.is_grad_enabled())
        # Each sequence's own mean cross-entropy, for per-source loss curves.
        row = rows // labels.shape[1]
        count = torch.zeros(labels.shape[0], device=h.device).index_add_(0, row, torch.ones_like(token_ce))
        row_ce = torch.zeros(labels.shape[0], device=h.device).index_add_(0, row, token_ce) / count.clamp(min=1)
        aux = {"ce": token_ce.mean() if len(rows) else token_ce.sum(), "z_loss": z, "row_ce": row_ce}
        if self.moe_layers:
            moe_loss = sum(m.loss for m in self.moe_layers)
            loss = loss + moe_loss
            aux["moe_loss"] = moe_loss.detach()
            aux["moe"] = {b.layer: b.mlp.stats for b in self.layers if isinstance(b.mlp, moe.MoE)}
        return logits, loss, aux

    def log_probs(self, input_ids, labels, position_ids=None, temperature=1.0):
        """log p(labels[t] | tokens <= t) for every position (B, T), 0 where labels == -100;
        differentiable, for dpo.py and rl.py. Chunks over time, recomputing each chunk's
        logits in the backward pass (checkpointing), so full logits are never kept. (A wrapped
        model: call it with log_probs=True instead, which runs the wrapper's hooks.)"""
        return self(input_ids, labels, position_ids, log_probs=True, temperature=temperature)[2]["log_probs"]

    def head_log_probs(self, h, labels, temperature=1.0):
        """log_probs' second half, from the final hidden states: {"log_probs": (B, T)}, and with
        MoE layers their balancing terms, undetached, as "moe_loss" (a stage adds them to its
        loss, as the forward with labels does)."""
        if hasattr(self.lm_head, "log_probs"):   # a vocabulary-parallel head (parallel.py) normalises over every rank
            lp = self.lm_head.log_probs(h, labels, temperature)
        else:
            step = max(1, _chunk_rows(self.config.padded_vocab) // h.shape[0])   # time steps per chunk
            lp = torch.cat([torch.utils.checkpoint.checkpoint(_label_log_probs, h[:, s:s + step], self.lm_head.weight,
                                                              labels[:, s:s + step], temperature, use_reentrant=False)
                            for s in range(0, h.shape[1], step)], dim=1)
        aux = {"log_probs": lp}
        if self.moe_layers:
            aux["moe_loss"] = sum(m.loss for m in self.moe_layers)
            aux["moe"] = {b.layer: b.mlp.stats for b in self.layers if isinstance(b.mlp, moe.MoE)}
        return aux

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=64, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None, on_token=None):
        """Sample continuations of a batch of prompts (lists of token ids, any lengths) with the
        KV cache: one forward over the left-padded prompts (padding gets position -1, which no
        token attends to), then one token per step. temperature 0 is greedy. A row stops after
        a token in stop_ids. on_token(row, token) is called as each token is chosen (to stream
        it). Returns the new tokens of each prompt (stop token included)."""
        prompts = [list(map(int, p)) for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        B, T = len(prompts), max(map(len, prompts))
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        device = self.embed_tokens.weight.device
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        pos = torch.full((B, T), -1, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = torch.tensor(p)
            pos[b, T - len(p):] = torch.arange(len(p))
        cache = Cache(self.config.n_layer)
        h = self.hidden_states(ids, pos, cache)[:, -1]
        next_pos = pos[:, -1:] + 1
        out, done, stop = [[] for _ in range(B)], [False] * B, set(stop_ids)
        for _ in range(max_new_tokens):
            logits = self.lm_head(h).float()
            logits[:, self.config.vocab_size:] = float("-inf")   # the padding rows are not tokens
            tok = sample(logits, temperature, top_k, top_p, generator)
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stop
                    if on_token is not None:
                        on_token(b, t)
            if all(done):
                break
            h = self.hidden_states(tok[:, None], next_pos, cache)[:, -1]
            next_pos = next_pos + 1
        return out

    def weights(self):
        """The state dict with each tensor once, under its first name (a tied head is the
        embedding, a shared expert bank its first layer's; safetensors refuses aliases),
        detached, contiguous, on the CPU: what checkpoints store."""
        out, seen = {}, set()
        for k, v in self.state_dict().items():
            if (v.data_ptr(), v.shape) not in seen:
                seen.add((v.data_ptr(), v.shape))
                out[k] = v.detach().contiguous().cpu()
        return out

    def num_params(self):
        """(total, non-embedding): each tensor once (a tied head is the embedding); non-embedding
        leaves out the lookup tables, but an untied head is a matmul and counts."""
        total = sum(p.numel() for p in self.parameters())
        emb = self.embed_tokens.weight.numel()
        if self.embed_positions is not None:
            emb += self.embed_positions.weight.numel()
        return total, total - emb

    def num_active_params(self):
        """Parameters one token goes through: everything outside the MoE layers once, and in
        each MoE layer its router, its shared experts and top_k / n_experts of its routed bank
        (a bank shared by several layers counts in each, as each layer runs it)."""
        moe_params = {id(p): p for m in self.moe_layers for p in m.parameters()}
        active = self.num_params()[0] - sum(p.numel() for p in moe_params.values())
        for m in self.moe_layers:
            bank = sum(p.numel() for p in m.experts.parameters())
            active += sum(p.numel() for p in m.parameters()) - bank + bank * m.top_k / m.n_experts
        return int(active)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM's appendix B): 6 per weight used in a matmul (2 forward,
        4 backward), plus attention's two (T x T) products, 6 * n_head * (qk_dim + v_dim) * T per
        attention layer, counted without the causal half, as PaLM and nanoGPT do. In MoE layers
        only the active weights count: the router and top_k of n_experts experts. A Mamba-2
        layer's chunked scan adds, per head, the chunk's (L x L) products with B and X,
        6 * L * (N + P), and writing and reading the (P x N) state, 6 * 2 * P * N: linear in T."""
        c = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for m in self.moe_layers:   # a shared bank runs once per layer that uses it
            matmul += m.gate.weight.numel() + sum(p.numel() for p in m.experts.parameters()) * m.top_k / m.n_experts
        qk, v = ((c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attention == "mla"
                 else (c.head_dim, c.head_dim))
        n_attn = sum(b.self_attn is not None for b in self.layers)
        scan = sum(6 * m.n_heads * (min(m.chunk_size, seq_len) * (m.d_state + m.head_dim) + 2 * m.head_dim * m.d_state)
                   for m in (b.mamba for b in self.layers) if m is not None)
        return 6 * int(matmul) + 6 * n_attn * c.n_head * (qk + v) * seq_len + scan

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """A Llama / SmolLM2 / SmolLM3 / Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 directory (config.json
        + model.safetensors, or sharded with model.safetensors.index.json) -> Model."""
        from safetensors.torch import load_file
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            hf = json.load(f)
        model = cls(config_from_hf(hf, cfg_path))
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            shards = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        state = {}
        arch = hf.get("architectures", ["?"])[0]
        for shard in shards:
            for k, t in load_file(os.path.join(path, shard)).items():
                state[our_name(k, arch)] = t
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)   # some tied checkpoints store the copy too
        c = model.config
        extra = [k for k in state if k.startswith("layers.") and int(k.split(".")[1]) >= c.n_layer]
        if extra and hf.get("num_nextn_predict_layers"):
            # DeepSeek-V3's multi-token-prediction module is stored as layers past the last
            # one; it predicts a second token for speculative decoding, which we do not use.
            print(f"{path}: skipping {len(extra)} tensors of the multi-token-prediction layers")
            for k in extra:
                del state[k]
        if c.attention == "mla" and hf.get("rope_interleave", True):
            for i in range(c.n_layer):
                q = f"layers.{i}.self_attn.{'q_proj' if c.q_lora_rank is None else 'q_b_proj'}.weight"
                kv = f"layers.{i}.self_attn.kv_a_proj_with_mqa.weight"
                if q in state and kv in state:   # else the key check below names them
                    state[q] = rope_rows_from_interleaved(state[q], c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim)
                    state[kv] = rope_rows_from_interleaved(state[kv], 1, c.kv_lora_rank, c.qk_rope_head_dim)
        state = experts_from_hf(state)
        expected = set(model.weights())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match {hf.get('architectures', ['?'])[0]}: "
                             f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                             f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        model.load_state_dict(state, strict=False)
        return model.to(dtype)

    def save_pretrained(self, path, max_shard_bytes=None):
        """Write config.json and safetensors that transformers loads as the matching class
        (DeepSeek-V3 for MLA, Qwen3-MoE for MoE, SmolLM3 with NoPE layers, Qwen3 with QK-norm,
        Qwen2 with q/k/v biases, else Llama).
        Files are written under temporary names and renamed, so a crash leaves no half file."""
        from safetensors.torch import save_file
        hf = config_to_hf(self.config)
        os.makedirs(path, exist_ok=True)
        state = {hf_name(k, hf["architectures"][0]): t for k, t in experts_to_hf(self.weights()).items()}
        shards, size = [{}], 0
        for k, t in state.items():   # greedy shards of at most max_shard_bytes (one tensor may exceed it)
            nbytes = t.numel() * t.element_size()
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k], size = t, size + nbytes
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        files = {name: lambda f, s=s: save_file(s, f, metadata={"format": "pt"}) for name, s in zip(names, shards)}
        files["config.json"] = lambda f: _write_json(f, hf)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            files["model.safetensors.index.json"] = lambda f: _write_json(f, index)
        for name, write in files.items():
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, os.path.join(path, name))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)


# Where transformers names a module differently: (ours, theirs), as the start of a name without
# its "model." / "backbone." prefix; {i} stands for a layer number. Other names are the same.
HF_RENAMES = {
    "Mamba2ForCausalLM": [("embed_tokens.", "embeddings."), ("norm.", "norm_f."),
                          ("layers.{i}.input_layernorm.", "layers.{i}.norm."),
                          ("layers.{i}.mamba.", "layers.{i}.mixer.")],
    "BambaForCausalLM": [("norm.", "final_layernorm."),
                         ("layers.{i}.post_attention_layernorm.", "layers.{i}.pre_ff_layernorm."),
                         ("layers.{i}.mlp.", "layers.{i}.feed_forward.")],
}


def _rename(key, pairs):
    """key with the first matching (src, dst) start rewritten."""
    for src, dst in pairs:
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(\d+)"), key)
        if m:
            return dst.replace("{i}", m.group(1) if m.groups() else "") + key[m.end():]
    return key


def hf_name(key, arch="LlamaForCausalLM"):
    """Our parameter name -> transformers' for that architecture (everything but the head lives
    under "model.", or "backbone." for Mamba-2)."""
    if key == "lm_head.weight":
        return key
    return ("backbone." if arch == "Mamba2ForCausalLM" else "model.") + _rename(key, HF_RENAMES.get(arch, ()))


def our_name(key, arch):
    """transformers' name -> ours: the inverse of hf_name (old Mamba-2 checkpoints also say
    "embedding." for "embeddings.")."""
    if key == "lm_head.weight":
        return key
    key = re.sub(r"^(model|backbone)\.", "", key)
    if arch == "Mamba2ForCausalLM":
        key = re.sub(r"^embedding\.", "embeddings.", key)
    return _rename(key, [(theirs, ours) for ours, theirs in HF_RENAMES.get(arch, ())])


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


HF_ARCHITECTURES = ("LlamaForCausalLM", "SmolLM3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                    "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM", "Mamba2ForCausalLM", "BambaForCausalLM")

# The Mamba-2 layer's ModelConfig fields and their config.json keys: (Mamba2's, Bamba's).
SSM_KEYS = {"ssm_heads": ("num_heads", "mamba_n_heads"), "ssm_head_dim": ("head_dim", "mamba_d_head"),
            "ssm_state": ("state_size", "mamba_d_state"), "ssm_groups": ("n_groups", "mamba_n_groups"),
            "ssm_conv": ("conv_kernel", "mamba_d_conv"), "ssm_chunk": ("chunk_size", "mamba_chunk_size"),
            "ssm_conv_bias": ("use_conv_bias", "mamba_conv_bias"), "ssm_proj_bias": ("use_bias", "mamba_proj_bias")}


def _ssm_from_hf(hf, arch, where):
    """The ssm_* fields of a Mamba2 or Bamba config.json."""
    bamba = arch == "BambaForCausalLM"
    expand, dim = hf.get("mamba_expand" if bamba else "expand", 2), hf["hidden_size"]
    out = {}
    for field, keys in SSM_KEYS.items():
        key = keys[bamba]
        if key not in hf:
            raise ValueError(f"{where}: {arch} needs {key!r}")
        out[field] = hf[key]
    if out["ssm_head_dim"] == "auto":
        out["ssm_head_dim"] = expand * dim // out["ssm_heads"]
    if out["ssm_heads"] * out["ssm_head_dim"] != expand * dim:
        raise ValueError(f"{where}: {keys[0]} x head_dim ({out['ssm_heads']} x {out['ssm_head_dim']}) must equal "
                         f"expand x hidden_size ({expand} x {dim})")
    # transformers 5 writes infinity as {"__float__": "Infinity"}, older versions as Infinity
    limit = [float(v["__float__"]) if isinstance(v, dict) else float(v) for v in hf.get("time_step_limit") or ()]
    if limit not in ([], [0.0, math.inf]):
        raise ValueError(f"{where}: time_step_limit {hf['time_step_limit']} is not supported (dt is not clamped here)")
    return out


def experts_from_hf(state):
    """Checkpoints on disk keep one tensor per expert (mlp.experts.E.gate_proj.weight ...);
    Experts holds the bank as two 3-D tensors. Stack them, gate above up (in place)."""
    groups = {}
    for k in [k for k in state if ".mlp.experts." in k and k.split(".mlp.experts.")[1][0].isdigit()]:
        prefix, rest = k.split(".mlp.experts.")
        e, name = rest.split(".", 1)
        groups.setdefault(prefix, {})[(int(e), name)] = state.pop(k)
    for prefix, t in groups.items():
        n = 1 + max(e for e, _ in t)
        state[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([t[e, "gate_proj.weight"], t[e, "up_proj.weight"]]) for e in range(n)])
        state[f"{prefix}.mlp.experts.down_proj"] = torch.stack([t[e, "down_proj.weight"] for e in range(n)])
    return state


def rope_rows_from_interleaved(w, n_head, nope, rope):
    """DeepSeek's checkpoints (rope_interleave=True) rotate interleaved pairs (0,1), (2,3), ... of
    each head's last `rope` features; MLA here rotates halves (i, i + rope/2). That is the same
    rotation after a fixed permutation of those features, so permute the rows of the projection
    that makes them: w's rows are n_head heads of `nope` unrotated then `rope` rotated rows
    (q_proj / q_b_proj; kv_a_proj_with_mqa is one "head" of kv_lora_rank latent rows then the
    shared rope key)."""
    perm = torch.cat([torch.arange(nope), nope + torch.arange(0, rope, 2), nope + torch.arange(1, rope, 2)])
    return w.view(n_head, nope + rope, -1)[:, perm].reshape(w.shape)


def experts_to_hf(state):
    """The inverse of experts_from_hf, for save_pretrained."""
    for k in [k for k in state if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = k[:-len("gate_up_proj")]
        gate_up, down = state.pop(k), state.pop(prefix + "down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2)
            state.update({f"{prefix}{e}.gate_proj.weight": gate.contiguous(), f"{prefix}{e}.up_proj.weight": up.contiguous(),
                          f"{prefix}{e}.down_proj.weight": down[e].contiguous()})
    return state


def aux_coef_from_hf(coef, top_k, n_moe_layers):
    """moe_aux_loss for a Hugging Face router_aux_loss_coef (Qwen3-MoE, Mixtral). transformers'
    load_balancing_loss_func pools the router statistics of all MoE layers and is top_k at
    perfect balance; moe.py's loss is 1 per layer at balance and the model sums the layers
    (Megatron's convention). coef * top_k / n_moe_layers gives the same total, and each router
    the same gradient while the layers' loads agree; exactly the same value when they route
    alike (the pooled product of means differs from the mean of per-layer products otherwise).
    config_to_hf inverts it."""
    return coef * top_k / max(n_moe_layers, 1)


def config_from_hf(hf, where="config.json"):
    """A Hugging Face config dict -> ModelConfig. Reads transformers 5's rope_parameters and the
    older rope_theta / rope_scaling."""
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} is not supported ({', '.join(HF_ARCHITECTURES)})")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: sliding-window attention (use_sliding_window) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if arch == "Mamba2ForCausalLM":   # no attention, no MLP: norm -> Mamba-2 -> residual, per layer
        n_layer = hf["num_hidden_layers"]
        return ModelConfig(vocab_size=hf["vocab_size"], vocab_multiple=1, n_layer=n_layer, dim=hf["hidden_size"],
                           n_head=1, n_kv_head=1, positions="none", mixers=("ssm",) * n_layer,
                           ffns=("none",) * n_layer, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", False), max_seq_len=1 << 20,
                           init_std=hf.get("initializer_range", 0.02), **_ssm_from_hf(hf, arch, where))
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    n_layer, n_head = hf["num_hidden_layers"], hf["num_attention_heads"]
    bias = arch == "Qwen2ForCausalLM"
    if arch != "Qwen2ForCausalLM" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError(f"{where}: attention_bias / mlp_bias are not supported for {arch}")
    moe_cfg, mla_cfg = {}, {}
    if arch == "DeepseekV3ForCausalLM":
        if rope:
            raise ValueError(f"{where}: rope_scaling {rope.get('rope_type', rope.get('type'))!r} with MLA is not "
                             "supported (DeepSeek's YaRN also rescales the softmax by mscale_all_dim)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"{where}: DeepSeek-V3 with scoring_func {hf.get('scoring_func')!r} or moe_layer_freq "
                             f"{hf.get('moe_layer_freq')} is not supported (sigmoid, 1)")
        dense = hf.get("first_k_dense_replace") or 0
        # K and V have one head per query head; config.json's head_dim is qk_rope_head_dim
        hf = {**hf, "num_key_value_heads": n_head, "head_dim": hf["qk_rope_head_dim"]}
        mla_cfg = dict(attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                       qk_rope_head_dim=hf["qk_rope_head_dim"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                       v_head_dim=hf["v_head_dim"])
        if dense < n_layer:
            moe_cfg = dict(n_experts=hf.get("n_routed_experts") or hf["num_local_experts"],
                           top_k=hf["num_experts_per_tok"], d_expert=hf["moe_intermediate_size"],
                           n_shared_experts=hf.get("n_shared_experts") or 0, router="sigmoid",
                           norm_topk_prob=hf.get("norm_topk_prob", True),
                           routed_scaling=float(hf.get("routed_scaling_factor", 1.0)),
                           n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                           ffns=tuple("dense" if i < dense else "moe" for i in range(n_layer)))
    if arch == "Qwen3MoeForCausalLM":
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        # transformers 5 writes num_local_experts; earlier versions and the Hub's configs num_experts
        ffns = tuple("moe" if i not in dense and (i + 1) % step == 0 else "dense" for i in range(n_layer))
        # router_aux_loss_coef absent: transformers' default, 0.001
        moe_cfg = dict(n_experts=hf.get("num_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"], d_expert=hf["moe_intermediate_size"],
                       norm_topk_prob=hf.get("norm_topk_prob", False), ffns=ffns,
                       moe_aux_loss=aux_coef_from_hf(hf.get("router_aux_loss_coef", 0.001), hf["num_experts_per_tok"],
                                                     ffns.count("moe")))
    ssm_cfg = {}
    if arch == "BambaForCausalLM":   # Mamba-2 layers except at attn_layer_indices; partial RoPE (half)
        attn = set(hf.get("attn_layer_indices") or ())
        ssm_cfg = dict(mixers=tuple("attention" if i in attn else "ssm" for i in range(n_layer)),
                       partial_rotary_factor=0.5, **_ssm_from_hf(hf, arch, where))
    nope = ()
    if arch == "SmolLM3ForCausalLM":
        flags = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                              for i in range(n_layer)]
        nope = tuple(i for i in range(n_layer) if not flags[i])
    return ModelConfig(
        vocab_size=hf["vocab_size"], vocab_multiple=1, n_layer=n_layer, dim=hf["hidden_size"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, mlp_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta), rope_scaling=rope,
        nope_layers=nope, qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), attn_bias=bias,
        init_std=hf.get("initializer_range", 0.02), **moe_cfg, **mla_cfg, **ssm_cfg)


def config_to_hf(c):
    """ModelConfig -> the config.json of the transformers class that computes the same function."""
    if c.mixers and "ssm" in c.mixers:
        return _ssm_config_to_hf(c)
    if c.attention == "mla":
        return _deepseek_v3_config(c)
    if c.positions != "rope" or c.partial_rotary_factor != 1.0:
        raise ValueError("save_pretrained: learned or no positions and partial RoPE have no matching "
                         "transformers class among Llama / SmolLM3 / Qwen2 / Qwen3")
    if sum(bool(x) for x in (c.nope_layers, c.qk_norm, c.attn_bias)) > 1:
        raise ValueError("save_pretrained: NoPE layers (SmolLM3), QK-norm (Qwen3) and q/k/v biases (Qwen2) "
                         "belong to different transformers classes; a model can use one of them")
    moe_layers = [i for i, f in enumerate(c.ffns or ()) if f == "moe"]
    if moe_layers and not (c.qk_norm and c.router == "softmax" and not c.n_shared_experts and c.moe_share == 1
                           and c.routed_scaling == 1.0 and c.capacity_factor is None and c.n_group == 1):
        raise ValueError("save_pretrained: with GQA, of the MoE models only Qwen3-MoE's has a transformers class "
                         "here: QK-norm, softmax router, no shared experts or shared banks, routed_scaling 1, "
                         "dropless, no expert groups (MLA models export as DeepSeek-V3)")
    arch, model_type = (("Qwen3MoeForCausalLM", "qwen3_moe") if moe_layers else
                        ("SmolLM3ForCausalLM", "smollm3") if c.nope_layers else
                        ("Qwen3ForCausalLM", "qwen3") if c.qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if c.attn_bias else ("LlamaForCausalLM", "llama"))
    hf = _common_hf(c, arch, model_type)
    hf.update(num_key_value_heads=c.n_kv_head, head_dim=c.head_dim)
    if c.rope_scaling:
        hf["rope_scaling"] = dict(c.rope_scaling)   # transformers 4.x reads this one
    if arch == "SmolLM3ForCausalLM":
        hf["no_rope_layers"] = [int(i not in c.nope_layers) for i in range(c.n_layer)]
    if arch == "Qwen2ForCausalLM":
        del hf["attention_bias"]
    if moe_layers:
        hf.update(num_experts=c.n_experts, num_experts_per_tok=c.top_k, moe_intermediate_size=c.d_expert or c.mlp_dim,
                  norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                  router_aux_loss_coef=c.moe_aux_loss * len(moe_layers) / c.top_k,
                  mlp_only_layers=[i for i in range(c.n_layer) if i not in moe_layers])
    return hf


def _ssm_config_to_hf(c):
    """A model with Mamba-2 layers -> Mamba2's config.json (every layer Mamba-2, no feed-forward,
    no positions) or Bamba's (Mamba-2 layers, attention layers with half-rotated RoPE, a SwiGLU
    in every layer)."""
    expand, rest = divmod(c.ssm_heads * c.ssm_head_dim, c.dim)
    pure = set(c.mixers) == {"ssm"} and set(c.ffns or ()) == {"none"} and c.positions == "none"
    bamba = (set(c.ffns or ("dense",)) == {"dense"} and c.attention == "gqa" and c.positions == "rope"
             and c.partial_rotary_factor == 0.5 and not (c.rope_scaling or c.nope_layers or c.qk_norm or c.attn_bias)
             and c.head_dim * c.n_head == c.dim)
    if rest or not (pure or bamba):
        raise ValueError("save_pretrained: models with Mamba-2 layers export as Mamba2 (every layer Mamba-2, "
                         "ffns 'none', positions 'none') or Bamba (GQA attention layers with partial_rotary_factor "
                         "0.5 and head_dim = dim / n_head, no RoPE scaling, NoPE, QK-norm or biases; a dense "
                         "SwiGLU in every layer), with ssm_heads * ssm_head_dim a multiple of dim")
    if pure:
        hf = dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", vocab_size=c.padded_vocab,
                  hidden_size=c.dim, num_hidden_layers=c.n_layer, layer_norm_epsilon=c.norm_eps, expand=expand,
                  hidden_act="silu", tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std,
                  residual_in_fp32=True, torch_dtype="float32", bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    else:
        hf = _common_hf(c, "BambaForCausalLM", "bamba")
        hf.update(num_key_value_heads=c.n_kv_head, mamba_expand=expand, mlp_bias=False, z_loss_coefficient=0.0,
                  attn_layer_indices=[i for i, m in enumerate(c.mixers) if m == "attention"])
        hf["rope_parameters"]["partial_rotary_factor"] = 0.5
    hf.update({keys[0 if pure else 1]: getattr(c, field) for field, keys in SSM_KEYS.items()})
    return hf


def _common_hf(c, arch, model_type):
    """config.json fields every exported class shares."""
    return dict(architectures=[arch], model_type=model_type, vocab_size=c.padded_vocab, hidden_size=c.dim,
                intermediate_size=c.mlp_dim, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std, attention_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})},
                rope_theta=c.rope_theta, torch_dtype="float32",
                # the token ids belong to the tokenizer; None keeps SmolLM3's defaults (128000...)
                # from pointing outside a small vocabulary
                bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _deepseek_v3_config(c):
    """An MLA model -> DeepseekV3ForCausalLM's config.json: MLA in every layer, `first_k_dense_replace`
    dense layers, then MoE layers with the sigmoid router, its selection bias and shared experts.
    RoPE is written in this file's half layout (rope_interleave false), so no rows move."""
    moe_layers = [i for i, f in enumerate(c.ffns or ()) if f == "moe"]
    k = moe_layers[0] if moe_layers else c.n_layer
    if (c.positions != "rope" or c.partial_rotary_factor != 1.0 or c.rope_scaling or c.nope_layers or c.qk_norm
            or c.attn_bias):
        raise ValueError("save_pretrained: MLA exports as DeepSeek-V3, which has full RoPE without scaling in every "
                         "layer and no QK-norm or attention biases")
    if moe_layers and (moe_layers != list(range(k, c.n_layer)) or c.router != "sigmoid" or not c.n_shared_experts
                       or c.moe_share != 1 or c.capacity_factor is not None):
        raise ValueError("save_pretrained: DeepSeek-V3's MoE layers are all the layers after the first dense ones, "
                         "with the sigmoid router, at least one shared expert, no shared banks, dropless")
    hf = _common_hf(c, "DeepseekV3ForCausalLM", "deepseek_v3")
    hf.update(num_key_value_heads=c.n_head, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
              qk_rope_head_dim=c.qk_rope_head_dim, qk_nope_head_dim=c.qk_nope_head_dim, v_head_dim=c.v_head_dim,
              rope_interleave=False, first_k_dense_replace=k, n_routed_experts=c.n_experts or 1,
              num_experts_per_tok=c.top_k if moe_layers else 1, moe_intermediate_size=c.d_expert or c.mlp_dim,
              n_shared_experts=c.n_shared_experts, routed_scaling_factor=c.routed_scaling,
              norm_topk_prob=c.norm_topk_prob, n_group=c.n_group if moe_layers else 1,
              topk_group=c.topk_group if moe_layers else 1, scoring_func="sigmoid", topk_method="noaux_tc",
              num_nextn_predict_layers=0)
    return hf


# -----------------------------------------------------------------------------
# The loss, a chunk of tokens at a time

def _chunk_rows(vocab):
    """Tokens per chunk: about 2^25 float32 logits (128 MiB) at a time, at least 256 rows."""
    return max(256, 2 ** 25 // vocab)


class ChunkedCrossEntropy(torch.autograd.Function):
    """loss = mean over tokens of (logsumexp(l) - l[y]) + z * mean logsumexp(l)^2, with l = h W^T;
    also returns each token's cross-entropy and the z term, detached, for logging.

    Autograd would keep every chunk's (rows x vocab) logits alive until the backward pass.
    Instead the forward pass computes each chunk's gradient as it goes: d loss / d l =
    softmax(l) * (1 + 2 z lse) - onehot(y), divided by the token count. Then it keeps only
    dL/dh and dL/dW and throws the logits away; backward just scales them. Same three
    matmuls as the unfused version, and the big tensor lives one chunk at a time.
    The division by the token count waits for the backward, in fp32, and dL/dh is kept in
    fp32: in fp16 a probability over a large vocabulary divided by thousands of tokens
    (1e-8) rounds to zero, and a gradient of 1e-5 keeps a few bits, before any loss scale
    can help.
    Takes only the rows that have a label (the caller drops the -100s)."""

    @staticmethod
    def forward(ctx, h, weight, labels, z_coef, grad_enabled):
        n = max(labels.numel(), 1)
        grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        w = weight.to(h.dtype)   # under bf16 autocast the matmuls run in bf16, the softmax in fp32
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if grad else None
        dw = None
        token_ce = torch.empty(labels.shape, dtype=torch.float32, device=h.device)
        z = torch.zeros((), dtype=torch.float32, device=h.device)
        step = _chunk_rows(weight.shape[0])
        for s in range(0, h.shape[0], step):
            hc, y = h[s:s + step], labels[s:s + step]
            logits = hc @ w.t()
            if kernels_on(logits):
                # The Triton kernel reads the logits in their own dtype, keeps the running max
                # and sum in fp32 registers, and overwrites the logits with their gradient.
                token_ce[s:s + len(y)], lse = cross_entropy_rows(logits, y, z_coef, grad)
                g = logits
            else:
                logits = logits.float()
                rows = torch.arange(y.numel(), device=y.device)
                logp = torch.log_softmax(logits, dim=-1)           # one fused pass over the chunk
                lse = logits[rows, y] - logp[rows, y]              # log-sum-exp, read off one column
                token_ce[s:s + len(y)] = -logp[rows, y]
                del logits
                if grad:
                    g = logp.exp_()                                # softmax, in logp's own memory
                    g.mul_((1 + 2 * z_coef * lse)[:, None])
                    g[rows, y] -= 1
                    g = g.to(h.dtype)
            z += lse.pow(2).sum()
            if grad:
                dh[s:s + len(y)] = g @ w
                dw = (g.t() @ hc).float() if dw is None else dw.add_(g.t() @ hc)
        if grad and dw is None:   # no labelled token at all
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        ctx.save_for_backward(dh, dw)
        ctx.n, ctx.h_dtype, ctx.weight_dtype = n, h.dtype, weight.dtype
        z = z / n
        ctx.mark_non_differentiable(token_ce, z)
        return token_ce.sum() / n + z_coef * z, token_ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_ce, _grad_z):
        dh, dw = ctx.saved_tensors
        scale = grad_loss.float() / ctx.n    # the mean's 1/n, in fp32 (see forward)
        return (dh * scale).to(ctx.h_dtype), (dw * scale).to(ctx.weight_dtype), None, None, None


# -----------------------------------------------------------------------------
# Cross-entropy as a Triton kernel (CUDA): one program per token row walks the vocabulary in
# tiles with a running max and sum (the online softmax), so the fp32 softmax over the whole
# vocabulary never exists; a second walk writes the gradient over the logits, in place.

if triton is not None:
    @triton.jit
    def _cross_entropy(LOGITS, LABELS, CE, LSE, V, stride, z_coef, GRAD: tl.constexpr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = LOGITS + row.to(tl.int64) * stride
        label = tl.load(LABELS + row)
        cols = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)   # rescale the old sum
            m = m_new
        lse = m + tl.log(s)
        valid = label != -100
        target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(CE + row, tl.where(valid, lse - target, 0.0))
        tl.store(LSE + row, lse)
        if GRAD:   # d/dlogits of ce + z lse^2 = softmax (1 + 2 z lse) - onehot (the caller divides by n)
            scale = tl.where(valid, 1.0, 0.0)
            for start in range(0, V, BLOCK):
                idx = start + cols
                x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * (1.0 + 2.0 * z_coef * lse) * scale
                g = tl.where(idx == label, g - scale, g)
                tl.store(base + idx, g.to(LOGITS.dtype.element_ty), mask=idx < V)


def cross_entropy_rows(logits, labels, z_coef=0.0, grad=False):
    """Per-row cross-entropy and logsumexp of logits (rows, V) by the Triton kernel; label
    -100 gives 0 and no gradient. With grad, logits is overwritten by d sum(ce + z_coef *
    lse^2) / d logits (values within [-1, 1 + 2 z lse]: no underflow in fp16)."""
    rows, V = logits.shape
    ce = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _cross_entropy[(rows,)](logits, labels, ce, lse, V, logits.stride(0), float(z_coef),
                            GRAD=bool(grad), BLOCK=min(4096, triton.next_power_of_2(V)))
    return ce, lse


def _label_log_probs(h, weight, labels, temperature):
    logits = (h @ weight.to(h.dtype).t()).float() / temperature
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return lp.masked_fill(labels == -100, 0.0)


# -----------------------------------------------------------------------------
# Sampling

def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V). temperature 0: argmax. top_k keeps the k most likely
    tokens; top_p keeps the smallest set whose probability reaches p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Inverse-CDF sampling: one uniform number per row, found in the row's cumulative
    # probabilities. torch.multinomial draws as many random numbers as the vocabulary has
    # tokens, which on a CPU dominated the whole generation (bench.py sampling). A token of
    # probability 0 owns an empty interval and is never drawn; scaling u by the row's total
    # absorbs the cumulative sum's rounding.
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


# -----------------------------------------------------------------------------
# The demo

def _demo():
    print(f"{'preset':14s} {'params':>15s} {'non-embedding':>15s} {'GFLOPs/token @2k':>17s} {'KV KiB/token':>13s}")
    for name in PRESETS:
        with torch.device("meta"):   # shapes only: no memory for 3B parameters
            m = Model(preset(name))
        c = m.config
        total, non_emb = m.num_params()
        kv = 2 * c.n_layer * c.n_kv_head * c.head_dim * 2 / 1024   # bf16
        print(f"{name:14s} {total:15,d} {non_emb:15,d} {m.flops_per_token(2048) / 1e9:17.2f} {kv:13.0f}")
    torch.manual_seed(0)
    model = Model(preset("tiny")).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    greedy = model.generate(prompts, max_new_tokens=8, temperature=0)
    print(f"\nrandom tiny model, greedy continuation of {prompts}:\n  {greedy}")
    sampled = model.generate(prompts, max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9,
                             generator=torch.Generator().manual_seed(0))
    print(f"sampled (temperature 1, top-k 50, top-p 0.9):\n  {sampled}")
    x = torch.randint(0, 4096, (2, 65))
    _, loss, _ = model(x[:, :-1], labels=x[:, 1:])
    print(f"initial loss on random tokens: {loss.item():.3f} (ln vocab = {math.log(4096):.3f}: "
          "a fresh model should know nothing)")


if __name__ == "__main__":
    _demo()

"""Tests for attention.py against transformers' Llama / Qwen2 / Qwen3 / DeepSeek-V3 attention
with copied weights, transformers' RoPE initialisers, a naive complex-number RoPE, running
documents alone, the full forward for cached decoding, and MLA's absorbed path against its
naive one."""

import pytest
import torch

import attention as A
from attention import MLA, Attention, KVCache, Rotary, apply_rope, attend, attention_mask, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

transformers = pytest.importorskip("transformers")


def hf_attention(arch, attn, dim, rope_parameters=None, eager=True):
    """A transformers attention layer of `arch` holding `attn`'s weights."""
    if arch == "llama":
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaAttention as Layer
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rope
    elif arch == "qwen2":
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as Layer
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rope
    else:
        from transformers import Qwen3Config as Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as Layer
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rope
    config = Config(hidden_size=dim, num_attention_heads=attn.n_head, num_key_value_heads=attn.n_kv_head,
                    head_dim=attn.head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    layer = Layer(config, layer_idx=0).eval()
    missing, unexpected = layer.load_state_dict(attn.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return layer, Rope(config)


@pytest.mark.parametrize("arch,n_head,n_kv_head,qk_norm,bias", [
    ("llama", 4, 4, False, False),   # MHA
    ("llama", 4, 2, False, False),   # GQA
    ("llama", 4, 1, False, False),   # MQA
    ("qwen2", 4, 2, False, True),    # q/k/v biases
    ("qwen3", 4, 2, True, False),    # QK-norm
])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_matches_transformers(arch, n_head, n_kv_head, qk_norm, bias, impl):
    dim, T = 64, 10
    attn = Attention(dim, n_head, n_kv_head, head_dim=16, bias=bias, qk_norm=qk_norm, impl=impl).eval()
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in attn.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "proj" in name else 1.0))
    layer, hf_rope = hf_attention(arch, attn, dim)
    x = torch.randn(2, T, dim)
    pos = torch.arange(T).expand(2, T)
    rotary = Rotary(16)
    cos, sin = hf_rope(x, pos)
    ours_cs = rotary(pos)
    torch.testing.assert_close(ours_cs[0], cos, rtol=1e-6, atol=1e-6)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(2, 1, T, T)
    with torch.no_grad():
        ref, _ = layer(x, position_embeddings=(cos, sin), attention_mask=causal)
        ours = attn(x, ours_cs)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_yarn_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for params in [{"factor": 4.0, "original_max_position_embeddings": 1024},
                   {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
                   {"factor": 2.0, "original_max_position_embeddings": 2048, "mscale": 0.707, "mscale_all_dim": 1.0},
                   {"factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 1.5, "truncate": False}]:
        for theta in (10000.0, 1_000_000.0):
            full = {"rope_type": "yarn", "rope_theta": theta, **params}
            config = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                 max_position_embeddings=4 * params["original_max_position_embeddings"],
                                 rope_parameters=full)
            ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
            ours, factor = rope_inv_freq(64, theta, full)
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
            assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama-3.2-1B
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072,
                         rope_parameters=params)
    ref, ref_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours, factor = rope_inv_freq(64, 500000.0, params)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert factor == ref_factor == 1.0
    base, _ = rope_inv_freq(64, 500000.0)
    assert (ours == base).any() and (ours == base / 32).any()  # some pairs kept, some slowed: all three regimes
    assert ((ours != base) & (ours != base / 32)).any()


def test_yarn_attention_matches_transformers():
    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    attn = Attention(64, 4, 2, head_dim=16, impl="eager").eval()
    layer, hf_rope = hf_attention("llama", attn, 64, rope_parameters=params)
    x, pos = torch.randn(1, 40, 64), torch.arange(40)[None]
    cos, sin = hf_rope(x, pos)
    causal = torch.full((40, 40), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, Rotary(16, scaling=params)(pos)),
                                   layer(x, position_embeddings=(cos, sin), attention_mask=causal)[0],
                                   rtol=1e-5, atol=1e-5)


def test_rope_against_complex_numbers_including_partial():
    """RoPE as rotation of complex numbers: pair (x_i, x_{i+R/2}) times e^{i pos theta_i}."""
    B, H, T, D = 2, 3, 7, 16
    for R in (16, 8, 4):  # full, half and quarter rotation
        x = torch.randn(B, H, T, D, dtype=torch.float64)
        pos = torch.randint(0, 64, (B, T))  # angles are float32, as in transformers: small positions for 1e-5
        rotary = Rotary(D, theta=500.0, partial_rotary_factor=R / D)
        cos, sin = rotary(pos)
        got = apply_rope(x, cos.double(), sin.double())
        freqs = 1.0 / 500.0 ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
        z = torch.complex(x[..., :R // 2], x[..., R // 2:R]) * torch.polar(
            torch.ones(B, 1, T, R // 2, dtype=torch.float64), pos[:, None, :, None].double() * freqs)
        want = torch.cat([z.real, z.imag, x[..., R:]], dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_distance():
    rotary = Rotary(32, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    score = lambda i, j: (apply_rope(q, *rotary(torch.tensor([[i]]))) * apply_rope(k, *rotary(torch.tensor([[j]])))).sum()
    torch.testing.assert_close(score(10, 3), score(110, 103), rtol=1e-4, atol=1e-4)


MLA_SHAPE = {"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12}


def deinterleave_rope_rows(w, n_head, nope, rope):
    """Rows of a projection whose heads end in `rope` interleaved-layout columns (DeepSeek's
    checkpoints), reordered to the half layout: pair (2i, 2i+1) becomes (i, i + rope/2)."""
    perm = torch.cat([torch.arange(nope), nope + torch.arange(0, rope, 2), nope + torch.arange(1, rope, 2)])
    return w.view(n_head, nope + rope, -1)[:, perm].reshape(w.shape)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("mode", ["eager", "sdpa", "absorbed"])
@pytest.mark.parametrize("interleave", [False, True])
def test_mla_matches_transformers(q_lora_rank, mode, interleave):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    dim, H, T = 64, 4, 10
    config = DeepseekV3Config(hidden_size=dim, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora_rank,
                              rope_interleave=interleave, attention_bias=False, max_position_embeddings=4096,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **MLA_SHAPE)
    config._attn_implementation = "eager"
    layer = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "proj" in name else 1.0))
    state = layer.state_dict()
    if interleave:  # what a loader of DeepSeek's checkpoints does
        q = "q_proj.weight" if q_lora_rank is None else "q_b_proj.weight"
        state[q] = deinterleave_rope_rows(state[q], H, 16, 8)
        state["kv_a_proj_with_mqa.weight"] = deinterleave_rope_rows(state["kv_a_proj_with_mqa.weight"], 1, 16, 8)
    mla = MLA(dim, H, q_lora_rank=q_lora_rank, impl="eager" if mode == "absorbed" else mode, **MLA_SHAPE).eval()
    mla.load_state_dict(state)  # strict: the same parameter names both ways
    x = torch.randn(2, T, dim)
    pos = torch.arange(T).expand(2, T)
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, pos)
    rope = Rotary(8)(pos)
    torch.testing.assert_close(rope[0], cos, rtol=1e-6, atol=1e-6)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(2, 1, T, T)
    with torch.no_grad():
        ref, _ = layer(x, position_embeddings=(cos, sin), attention_mask=causal)
        ours = mla(x, rope, absorb=mode == "absorbed")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def make_mla(**kw):
    torch.manual_seed(0)
    mla = MLA(**{"dim": 48, "n_head": 6, "q_lora_rank": 20, **MLA_SHAPE, **kw}).eval()
    with torch.no_grad():  # non-trivial norm weights
        mla.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return mla


@pytest.mark.parametrize("with_mask", [True, False])
def test_mla_absorbed_equals_naive(with_mask):
    mla = make_mla()
    rotary = Rotary(8)
    x = torch.randn(2, 11, 48)
    pos = torch.tensor([list(range(11)), [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1]] if with_mask else [list(range(11))] * 2)
    with torch.no_grad():
        mask = attention_mask(pos) if with_mask else None
        naive = mla(x, rotary(pos), mask, absorb=False)
        torch.testing.assert_close(mla(x, rotary(pos), mask, absorb=True), naive, rtol=1e-5, atol=1e-5)
        assert torch.equal(mla(x, rotary(pos), mask), naive)  # no cache: naive by default
        outs = []
        for absorb in (True, False, None):  # 7 tokens prefilled, then 4 at once (a mask of None is causal, offset by 7)
            cache = KVCache(1)
            mla(x[:, :7], rotary(pos[:, :7]), attention_mask(pos[:, :7], cache), cache)
            mask = attention_mask(pos[:, 7:], cache) if with_mask else None
            outs.append(mla(x[:, 7:], rotary(pos[:, 7:]), mask, cache, absorb=absorb))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[2], outs[0])  # a cache holding tokens: absorbed by default


@pytest.mark.parametrize("q_lora_rank", [None, 20])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mla_cached_decoding_equals_full_forward(q_lora_rank, impl):
    mla = make_mla(q_lora_rank=q_lora_rank, impl=impl)
    rotary = Rotary(8)
    x = torch.randn(2, 13, 48)
    pos = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        full = mla(x, rotary(pos))  # naive
        cache, outs = KVCache(1), []
        for a, b in [(0, 5), (5, 6), (6, 9)] + [(t, t + 1) for t in range(9, 13)]:  # then absorbed
            outs.append(mla(x[:, a:b], rotary(pos[:, a:b]), attention_mask(pos[:, a:b], cache), cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    # Only the latent and the shared rope key are cached, never per-head keys or values.
    assert cache.k[0].shape == (2, 1, 13, 16) and cache.v[0].shape == (2, 1, 13, 8)
    assert cache.nbytes() == 2 * 13 * (16 + 8) * 4


def make_layer(kind, **kw):
    return make_mla(**kw) if kind == "mla" else make_attention(qk_norm=True, **kw)


def make_attention(**kw):
    torch.manual_seed(0)
    kw = {"dim": 48, "n_head": 6, "n_kv_head": 2, **kw}
    return Attention(**kw).eval()


@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("rope", ["rope", "partial", "nope"])
def test_document_masking_equals_documents_alone(kind, impl, rope):
    attn = make_layer(kind, impl=impl)  # rope head size 8 for both
    rotary = None if rope == "nope" else Rotary(8, partial_rotary_factor=0.5 if rope == "partial" else 1.0)
    lengths = [5, 1, 9, 3]
    x = torch.randn(1, sum(lengths), 48)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = attn(x, rotary and rotary(pos), attention_mask(pos))
        alone, a = [], 0
        for n in lengths:
            p = torch.arange(n)[None]
            alone.append(attn(x[:, a:a + n], rotary and rotary(p)))
            a += n
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=1e-5, atol=1e-5)


def test_eager_equals_sdpa_with_masks():
    x = torch.randn(3, 11, 48)
    pos = torch.tensor([list(range(11)), [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1], [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7]])
    rotary = Rotary(8)
    outs = []
    for impl in ("eager", "sdpa"):
        attn = make_attention(impl=impl)
        with torch.no_grad():
            outs.append(attn(x, rotary(pos.clamp(min=0)), attention_mask(pos)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # mask=None with fewer queries than keys (a cache) is causal aligned to the last key, in both
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 5)  # and a value size of its own
    torch.testing.assert_close(attend(q, k, v, impl="eager"), attend(q, k, v, impl="sdpa"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [6, 2, 1])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(n_kv_head, impl):
    attn = make_attention(n_kv_head=n_kv_head, impl=impl, qk_norm=True)
    rotary = Rotary(8, partial_rotary_factor=0.5)
    x = torch.randn(2, 13, 48)
    pos = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        full = attn(x, rotary(pos))
        cache, outs = KVCache(1), []
        for a, b in [(0, 5), (5, 6), (6, 9)] + [(t, t + 1) for t in range(9, 13)]:
            outs.append(attn(x[:, a:b], rotary(pos[:, a:b]), attention_mask(pos[:, a:b], cache), cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.k[0].shape == (2, n_kv_head, 13, 8)  # K/V stored once per K/V head
    assert cache.nbytes() == 2 * 2 * n_kv_head * 13 * 8 * 4


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_left_padded_batch_decodes_like_each_prompt_alone(kind):
    attn = make_layer(kind)
    rotary = Rotary(8)
    prompts = [torch.randn(1, 7, 48), torch.randn(1, 4, 48)]
    steps = torch.randn(2, 3, 48)  # three decoded tokens per row
    x = torch.cat([prompts[0], torch.cat([torch.zeros(1, 3, 48), prompts[1]], 1)])
    pos = torch.tensor([list(range(7)), [-1, -1, -1, 0, 1, 2, 3]])
    with torch.no_grad():
        cache = KVCache(1)
        outs = [attn(x, rotary(pos.clamp(min=0)), attention_mask(pos, cache), cache)]
        last = pos.max(1, keepdim=True).values
        for t in range(3):
            p = last + 1 + t
            outs.append(attn(steps[:, t:t + 1], rotary(p), attention_mask(p, cache), cache))
        batched = torch.cat(outs, 1)
        for row, prompt in enumerate(prompts):
            n = prompt.shape[1]
            seq = torch.cat([prompt, steps[row:row + 1]], 1)
            alone = attn(seq, rotary(torch.arange(n + 3)[None]))
            torch.testing.assert_close(batched[row, -(n + 3):], alone[0], rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match=r"n_head \(6\) must be a multiple of n_kv_head \(4\)"):
        Attention(48, 6, 4)
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic' is not supported"):
        rope_inv_freq(8, scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="even size"):
        Rotary(8, partial_rotary_factor=0.375)
    with pytest.raises(ValueError, match="impl must be"):
        attend(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), impl="flash")


def test_demo(capsys):
    import attention

    attention._demo()
    out = capsys.readouterr().out
    assert "GQA" in out and "MLA" in out and "max |difference|" in out


# -----------------------------------------------------------------------------
# Flash attention: the Triton kernels (run by Triton's interpreter on machines without CUDA)
# against `attend`'s eager reference with the dense mask.

def dense_reference(q, k, v, position_ids, causal):
    T = q.shape[2]
    mask = torch.ones(1, T, T, dtype=torch.bool)
    mask = mask.tril() if causal else mask
    if position_ids is not None:
        doc = A.document_ids(position_ids)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return attend(q, k, v, mask[:, None], "eager")


def packed_positions(B, T, generator, pad=0):
    """Each row: `pad` padding tokens (position -1), then documents of random lengths 1..T."""
    rows = []
    for _ in range(B):
        pos = [-1] * pad
        while len(pos) < T:
            pos += range(int(torch.randint(1, T + 1, (1,), generator=generator)))
        rows.append(pos[:T])
    return torch.tensor(rows)


@pytest.fixture
def flash(kernels, monkeypatch):
    """The flash kernels on (the GPU, or CPU tensors under Triton's interpreter), 16 x 16 tiles
    (several tiles at small T), and every buffer they allocate poisoned. Returns a function
    that runs flash_attention there and gives back the output and gradients on the CPU."""
    kernels.on()
    kernels.poison()
    kernels.small_tiles()
    dev = kernels.device

    def run(q, k, v, position_ids=None, causal=True, grad=None):
        inputs = [t.detach().to(dev).requires_grad_() for t in (q, k, v)]
        out = A.flash_attention(*inputs, None if position_ids is None else position_ids.to(dev), causal)
        grads = torch.autograd.grad(out, inputs, grad.to(dev)) if grad is not None else ()
        return out.detach().cpu(), [g.cpu() for g in grads]
    return run


FLASH_CASES = {   # B, H, Hkv, T, D, Dv, causal, documents, padding
    "mha-causal-one-tile": (2, 2, 2, 16, 16, 16, True, False, 0),
    "gqa2-odd-length": (2, 4, 2, 37, 16, 16, True, False, 0),
    "mqa-documents": (2, 4, 1, 45, 16, 16, True, True, 0),
    "gqa4-documents-padding": (2, 4, 1, 33, 32, 32, True, True, 5),
    "d64-documents": (1, 2, 1, 29, 64, 64, True, True, 0),
    "d128": (1, 2, 2, 20, 128, 128, True, False, 0),
    "d24-dv16-mla-like": (1, 3, 3, 23, 24, 16, True, True, 0),
    "bidirectional-documents": (2, 2, 1, 31, 16, 16, False, True, 0),
    "bidirectional": (1, 2, 2, 18, 16, 16, False, False, 0),
    "one-token": (1, 2, 1, 1, 16, 16, True, False, 0),
}


@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attention_equals_the_reference(case, flash):
    B, H, Hkv, T, D, Dv, causal, documents, pad = FLASH_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q = torch.randn(B, H, T, D, generator=gen).requires_grad_()
    k = torch.randn(B, Hkv, T, D, generator=gen).requires_grad_()
    v = torch.randn(B, Hkv, T, Dv, generator=gen).requires_grad_()
    pos = packed_positions(B, T, gen, pad) if documents else None
    g = torch.randn(B, H, T, Dv, generator=gen)
    if documents:
        assert (pos[:, 1:] == 0).any()        # the case really packs several documents
    want = dense_reference(q, k, v, pos, causal)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    got, got_grads = flash(q, k, v, pos, causal, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", ["gqa2-odd-length", "gqa4-documents-padding", "bidirectional-documents"])
def test_flash_attention_with_unequal_tiles(case, tiles, flash, kernels):
    # Tuned settings may give queries and keys different tile sizes: the causal and document
    # bounds round to each kernel's own tiles.
    kernels.small_tiles(*tiles)
    test_flash_attention_equals_the_reference(case, flash)


def test_flash_attention_takes_the_models_memory_order(flash):
    """q, k, v as the model makes them: transposed views of (B, T, H, D) projections."""
    B, T, H, Hkv, D = 2, 21, 4, 2, 16
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hkv, D).transpose(1, 2).requires_grad_()
    g = torch.randn(B, H, T, D)
    want = dense_reference(q, k, v, None, True)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    got, got_grads = flash(q, k, v, grad=g)    # .to(device) keeps the strides
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_flash_attention_skips_tiles_outside_the_document(flash):
    """Two documents of two tiles each, the first one's keys and values NaN. A kernel that
    loaded any tile of the first document for the second one's queries (and masked it
    afterwards) would still turn NaN: 0 * NaN is NaN. The second document's outputs and
    gradients must be finite and equal to that document run alone."""
    B, H, T, D = 1, 2, 64, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, 1, T, D), torch.randn(B, 1, T, D)
    k[:, :, :32], v[:, :, :32] = float("nan"), float("nan")
    pos = torch.cat([torch.arange(32), torch.arange(32)])[None]
    g = torch.randn(B, H, T, D)
    got, (dq, dk, dv) = flash(q, k, v, pos, grad=g)
    second = (slice(None), slice(None), slice(32, None))
    alone = [t[second].detach().requires_grad_() for t in (q, k, v)]
    want = dense_reference(*alone, None, True)
    want_grads = torch.autograd.grad(want, alone, g[second])
    torch.testing.assert_close(got[second], want, rtol=1e-5, atol=1e-5)
    for a, b in zip((dq, dk, dv), want_grads):
        torch.testing.assert_close(a[second], b, rtol=1e-5, atol=2e-5)
    # The poison does reach the second document when nothing separates them.
    assert flash(q, k, v)[0][second].isnan().all()


def test_flash_attention_without_the_kernels_is_the_dense_reference():
    """Where the kernels do not run (here: CPU tensors), flash_attention is sdpa with the mask."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 19, 16), torch.randn(2, 2, 19, 16), torch.randn(2, 2, 19, 8)
    pos = packed_positions(2, 19, gen, pad=2)
    for causal in (True, False):
        for p in (pos, None):
            torch.testing.assert_close(A.flash_attention(q, k, v, p, causal), dense_reference(q, k, v, p, causal),
                                       rtol=1e-5, atol=1e-5)


def test_flash_attention_errors_name_the_shapes():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match=r"k \(1, 3, 8, 16\)"):
        A.flash_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))   # 4 heads, 3 K/V heads
    with pytest.raises(ValueError, match="want q"):
        A.flash_attention(q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match="position_ids"):
        A.flash_attention(q, q, q, torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="share a dtype"):
        A.flash_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="up to 256"):
        A.flash_attention(torch.randn(1, 1, 4, 512), torch.randn(1, 1, 4, 512), torch.randn(1, 1, 4, 512))


def test_attention_mask_for_the_flash_kernel():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert attention_mask(torch.arange(5)[None], flash=True) is None          # plain causal
    assert attention_mask(pos, flash=True) is pos                               # the kernel reads documents
    cache = KVCache(1)
    assert attention_mask(pos, cache, flash=True).dtype == torch.bool           # decoding: the dense mask


def test_document_spans():
    doc, first, last = A.document_spans(torch.tensor([[-1, -1, 0, 1, 2, 0, 1], [0, 1, 0, 0, 1, 2, 3]]))
    assert doc.tolist() == [[-1, -1, 1, 1, 1, 2, 2], [1, 1, 2, 3, 3, 3, 3]]
    assert first.tolist() == [[0, 0, 2, 2, 2, 5, 5], [0, 0, 2, 3, 3, 3, 3]]
    assert last.tolist() == [[2, 2, 5, 5, 5, 7, 7], [2, 2, 3, 7, 7, 7, 7]]


def test_kernels_run_on_cuda_unless_the_environment_says_no(monkeypatch):
    pytest.importorskip("triton")
    from types import SimpleNamespace
    assert A.kernels_on(SimpleNamespace(is_cuda=True)) and not A.kernels_on(SimpleNamespace(is_cuda=False))
    monkeypatch.setenv("NANOPLAYBOOK_KERNELS", "0")
    assert not A.kernels_on(SimpleNamespace(is_cuda=True))


def test_flash_attention_in_half_precision(flash):
    """fp16 inputs (the casts of p and dS before each dot) against the float32 reference.
    bf16 cannot be checked here: Triton 3.9's interpreter computes bf16 dots wrongly (a plain
    16 x 16 bf16 tl.dot is off by 1e10), so bf16 is known to work only once it runs on a GPU."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 37, 32, generator=gen), torch.randn(1, 2, 37, 32, generator=gen), \
        torch.randn(1, 2, 37, 32, generator=gen)
    pos = torch.cat([torch.arange(10), torch.arange(27)])[None]
    g = torch.randn(1, 4, 37, 32, generator=gen)
    got, grads = flash(q.half(), k.half(), v.half(), pos, grad=g.half())
    full = [t.half().float().requires_grad_() for t in (q, k, v)]
    want = dense_reference(*full, pos, True)
    want.backward(g.half().float())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads, full):
        torch.testing.assert_close(a.float(), b.grad, rtol=1e-2, atol=1e-2)

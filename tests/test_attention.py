"""Tests for attention.py against transformers' Llama / Qwen2 / Qwen3 attention with copied
weights, transformers' RoPE initialisers, a naive complex-number RoPE, running documents
alone, and the full forward for cached decoding."""

import pytest
import torch

from attention import Attention, KVCache, Rotary, apply_rope, attend, attention_mask, rope_inv_freq

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


def make_attention(**kw):
    torch.manual_seed(0)
    kw = {"dim": 48, "n_head": 6, "n_kv_head": 2, **kw}
    return Attention(**kw).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("rope", ["rope", "partial", "nope"])
def test_document_masking_equals_documents_alone(impl, rope):
    attn = make_attention(impl=impl, qk_norm=True)
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


def test_left_padded_batch_decodes_like_each_prompt_alone():
    attn = make_attention()
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
    assert "GQA" in out and "max |difference|" in out

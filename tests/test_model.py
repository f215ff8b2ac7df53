"""Tests for model.py: parameter counts against transformers, logits of randomly initialised
transformers models round-tripped both ways, the chunked loss and log-probs against the
unchunked formulas, cached decoding against re-running the full forward, batched generation
against one prompt at a time, document masking against documents alone, sampling filters,
and every error the issue asks for."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import Model, ModelConfig, preset

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=256, n_layer=3, dim=64, n_head=4, n_kv_head=2, mlp_dim=96, max_seq_len=128)


def randomize(m, scale=0.2):
    """Weights far from the init (norms and biases too), so that a wrong mapping shows."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * scale)
    return m


# -----------------------------------------------------------------------------
# Sizes

@pytest.mark.parametrize("name,published", [
    ("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
    ("smollm3-3b", 3_075_098_624), ("llama3.2-1b", 1_235_814_400)])
def test_preset_parameter_counts_match_transformers(name, published):
    with torch.device("meta"):
        ours = Model(preset(name))
        theirs = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**M.config_to_hf(ours.config)))
    total, non_embedding = ours.num_params()
    assert total == published == theirs.num_parameters()
    assert non_embedding == total - ours.config.padded_vocab * ours.config.dim


def test_vocab_is_padded_to_a_multiple_of_128():
    m = Model(ModelConfig(**{**SMALL, "vocab_size": 257}))
    assert m.embed_tokens.weight.shape[0] == m.lm_head.weight.shape[0] == 384
    assert m.lm_head.weight is m.embed_tokens.weight                     # tied
    untied = Model(ModelConfig(**{**SMALL, "tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert set(untied.weights()) - set(m.weights()) == {"lm_head.weight"}   # stored only when untied


def test_flops_per_token_is_6n_plus_attention():
    c = preset("smollm2-135m")
    with torch.device("meta"):
        m = Model(c)
    per_layer = 2 * c.dim * c.n_head * c.head_dim + 2 * c.dim * c.n_kv_head * c.head_dim + 3 * c.dim * c.mlp_dim
    n = c.n_layer * per_layer + c.padded_vocab * c.dim        # the tied head is a matmul too
    assert m.flops_per_token(2048) == 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * 2048


def test_flops_per_token_of_a_hybrid_counts_attention_only_in_attention_layers():
    c = ModelConfig(vocab_size=1000, n_layer=4, dim=64, n_head=4, n_kv_head=2, mlp_dim=96, mixers="MAMM",
                    ssm_head_dim=16, ssm_state=8, ssm_chunk=32)
    with torch.device("meta"):
        m = Model(c)
    heads, P, N, L = 8, 16, 8, 32
    d_inner, conv = heads * P, heads * P + 2 * N
    ssm_weights = 64 * (d_inner + conv + heads) + d_inner * 64           # in_proj, out_proj
    attn_weights = 2 * 64 * 4 * 16 + 2 * 64 * 2 * 16
    n = 3 * ssm_weights + attn_weights + 4 * 3 * 64 * 96 + c.padded_vocab * 64
    scan = 6 * heads * (L * (N + P) + 2 * P * N)
    assert m.flops_per_token(512) == 6 * n + 12 * 4 * 16 * 512 + 3 * scan
    assert m.flops_per_token(16) == 6 * n + 12 * 4 * 16 * 16 + 3 * 6 * heads * (16 * (N + P) + 2 * P * N)


def test_init_std_and_scaled_residual_projections():
    c = ModelConfig(vocab_size=4096, n_layer=8, dim=256, n_head=4, n_kv_head=4, mlp_dim=1024, init_std=0.02)
    m = Model(c)
    std = lambda t: t.detach().std().item()
    assert std(m.layers[0].self_attn.q_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(m.embed_tokens.weight) == pytest.approx(0.02, rel=0.05)
    assert std(m.layers[0].mlp.down_proj.weight) == pytest.approx(0.02 / 4, rel=0.05)   # sqrt(2 * 8) = 4
    assert std(m.layers[0].self_attn.o_proj.weight) == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(m.layers[0].input_layernorm.weight == 1)


def test_mamba_layers_keep_their_own_init():
    """The model's N(0, std) loop must not overwrite A, dt, D or the convolution (a zero dt_bias
    would give every head the same time scale); out_proj is a residual projection."""
    m = Model(ModelConfig(vocab_size=256, n_layer=8, dim=256, n_head=4, mixers="MMMAMMMA", ssm_state=16))
    mamba = m.layers[0].mamba
    dt = F.softplus(mamba.dt_bias)
    assert dt.min() >= 0.999e-3 and dt.max() <= 0.1001 and dt.std() > 0
    assert torch.all(mamba.D == 1) and torch.all(-mamba.A_log.exp() <= -1)
    assert mamba.conv1d.weight.abs().max() > 0.1                          # nn.Conv1d's init, not std 0.02
    assert mamba.out_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(mamba.norm.weight == 1)


# -----------------------------------------------------------------------------
# Hugging Face interop

HF_CASES = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "smollm2": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True),
    "smollm3": dict(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", tie_word_embeddings=True,
                    no_rope_layers=[1, 0, 1]),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", tie_word_embeddings=True),
    "qwen3-moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", tie_word_embeddings=False,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3-moe-sparse-step": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                                  tie_word_embeddings=True, num_experts=6, num_experts_per_tok=3,
                                  moe_intermediate_size=16, norm_topk_prob=False, decoder_sparse_step=2),
    "deepseek-v3": dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", tie_word_embeddings=False,
                        q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, head_dim=8, num_key_value_heads=4, qk_nope_head_dim=16, v_head_dim=16,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=32,
                        n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
                        rope_interleave=True, num_nextn_predict_layers=0),
    "deepseek-v3-no-q-lora": dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                                  tie_word_embeddings=True, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, head_dim=8, num_key_value_heads=4,
                                  qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=3,
                                  n_group=1, topk_group=1, moe_intermediate_size=16, n_shared_experts=2,
                                  routed_scaling_factor=1.0, first_k_dense_replace=0, norm_topk_prob=False,
                                  rope_interleave=False, num_nextn_predict_layers=0),
    "mamba2": dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", tie_word_embeddings=False,
                   num_heads=8, head_dim=16, state_size=12, n_groups=2, expand=2, conv_kernel=4, chunk_size=16,
                   layer_norm_epsilon=1e-5, use_conv_bias=True, use_bias=False),
    "mamba2-tied-biases": dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", tie_word_embeddings=True,
                               num_heads=4, head_dim=32, state_size=8, n_groups=1, expand=2, conv_kernel=3,
                               chunk_size=8, use_conv_bias=False, use_bias=True),
    "bamba": dict(architectures=["BambaForCausalLM"], model_type="bamba", tie_word_embeddings=False,
                  attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=12, mamba_n_groups=2,
                  mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=16, mamba_conv_bias=True, mamba_proj_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "llama-yarn": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 32}),
    "llama3-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
}


def hf_model(case):
    spec = dict(HF_CASES[case])
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None,
              rope_parameters=spec.pop("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}))
    arch = spec.pop("architectures")[0]
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **{**kw, **spec})
    config.architectures = [arch]
    config._attn_implementation = "eager"
    model = randomize(getattr(transformers, arch)(config).eval(), scale=0.1)
    with torch.no_grad():   # DeepSeek-V3's selection bias is a buffer: make it matter
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


@pytest.mark.parametrize("case", list(HF_CASES))
def test_from_pretrained_and_save_pretrained_match_transformers(case, tmp_path):
    theirs = hf_model(case)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")       # sharded, with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = Model.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 256, (2, 40))                    # longer than yarn / llama3's original 32
    with torch.no_grad():
        ref = theirs(x).logits
        logits, _, _ = ours(x)
    assert (logits - ref).abs().max() < 1e-4

    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, HF_CASES[case]["architectures"][0]).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() < 1e-4
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == \
        HF_CASES[case]["architectures"]


@pytest.mark.parametrize("moe_layers", [[2], [0, 2]])
def test_balance_loss_times_the_converted_coefficient_equals_transformers(moe_layers):
    """A Qwen3-MoE config's router_aux_loss_coef times transformers' load_balancing_loss_func
    (top_k at perfect balance, the router statistics averaged over the MoE layers' tokens
    together) equals our balance loss (1 at balance, summed over layers) times the coefficient
    config_from_hf converts it to, on the same router logits; and it writes back unchanged.
    Two layers give the same value only when they route alike (transformers multiplies the
    layer-averaged loads and probabilities, we average per-layer products), so every layer
    here sees the embedding: o_proj and down_proj are zero, the routers equal."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    hf = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     num_experts=6, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                                     mlp_only_layers=[i for i in range(3) if i not in moe_layers]).to_dict()
    hf["architectures"] = ["Qwen3MoeForCausalLM"]
    c = M.config_from_hf(hf)
    assert [i for i, f in enumerate(c.ffns) if f == "moe"] == moe_layers
    torch.manual_seed(0)
    ours = Model(c).eval()
    logits = []
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()
        for m in ours.moe_layers:
            m.gate.weight.copy_(ours.moe_layers[0].gate.weight)
            m.gate.register_forward_hook(lambda mod, args, out: logits.append(out[0]))
        x = torch.randint(0, 256, (2, 16))
        _, _, aux = ours(x[:, :-1], labels=x[:, 1:])
    assert len(logits) == len(moe_layers)
    theirs = hf["router_aux_loss_coef"] * load_balancing_loss_func(tuple(logits), 6, 2)
    torch.testing.assert_close(aux["moe_loss"], theirs, rtol=1e-5, atol=0)
    assert M.config_to_hf(c)["router_aux_loss_coef"] == pytest.approx(0.02, rel=1e-12)


def test_our_sharded_checkpoint_loads_in_transformers_and_back(tmp_path):
    ours = randomize(Model(ModelConfig(**SMALL)).eval(), 0.1)
    ours.save_pretrained(tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]      # no temporary files left
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = Model.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max() < 1e-4
        assert torch.equal(ours(x)[0], again(x)[0])


def test_checkpoint_errors_name_the_problem(tmp_path):
    theirs = hf_model("llama")
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())

    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.mlp.up_proj.weight'\].*"
                                         r"unexpected keys \['layers.0.extra.weight'\]"):
        Model.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Model.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="partial RoPE"):
        Model(ModelConfig(**SMALL, partial_rotary_factor=0.5)).save_pretrained(tmp_path / "partial")
    mla = dict(SMALL, attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    with pytest.raises(ValueError, match="DeepSeek-V3's MoE layers"):   # softmax router: no such class
        Model(ModelConfig(**mla, n_experts=4, top_k=2, d_expert=16, n_shared_experts=1)).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="QK-norm"):
        Model(ModelConfig(**mla, qk_norm=True)).save_pretrained(tmp_path / "m")
    hybrid = dict(SMALL, mixers="MAM", ssm_head_dim=16, ssm_state=8)
    with pytest.raises(ValueError, match="Mamba2 .* or Bamba .*partial_rotary_factor 0.5"):
        Model(ModelConfig(**hybrid)).save_pretrained(tmp_path / "h")    # full RoPE: no Bamba
    mamba = hf_model("mamba2")
    mamba.save_pretrained(tmp_path / "mamba")
    cfg = json.loads((tmp_path / "mamba" / "config.json").read_text())
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({**cfg, "time_step_limit": [0.001, 0.1]}))
    with pytest.raises(ValueError, match=r"config.json: time_step_limit \[0.001, 0.1\] is not supported"):
        Model.from_pretrained(tmp_path / "mamba")
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="config.json: hidden_act 'gelu' is not supported"):
        Model.from_pretrained(tmp_path / "mamba")
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_groups"}))
    with pytest.raises(ValueError, match="config.json: Mamba2ForCausalLM needs 'n_groups'"):
        Model.from_pretrained(tmp_path / "mamba")


# -----------------------------------------------------------------------------
# The loss and log-probs

@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_plain_formula(z_loss, monkeypatch):
    monkeypatch.setattr(M, "_chunk_rows", lambda vocab: 7)     # many chunks, one ragged
    m = randomize(Model(ModelConfig(**SMALL, z_loss=z_loss)), 0.1)
    x = torch.randint(0, 256, (3, 17))
    y = torch.randint(0, 256, (3, 17))
    y[0, :5] = -100
    y[2, -1] = -100
    _, loss, aux = m(x, labels=y)
    loss.backward()
    ours = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    logits = m(x)[0].float()
    lse = logits.logsumexp(-1)[y != -100]
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ref = ce + z_loss * lse.pow(2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["z_loss"], lse.pow(2).mean().detach(), rtol=1e-5, atol=1e-6)
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view(3, 17)
    row_ce = per_token.sum(1) / (y != -100).sum(1)
    torch.testing.assert_close(aux["row_ce"], row_ce.detach(), rtol=1e-5, atol=1e-6)
    for g, p in zip(ours, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_loss_matches_transformers_llama():
    theirs = hf_model("smollm2")
    ours = Model(M.config_from_hf(theirs.config.to_dict()))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()})
    x = torch.randint(0, 256, (2, 30))
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)    # ours come shifted already
    with torch.no_grad():
        ref = theirs(x, labels=x).loss
        _, loss, _ = ours(x, labels=labels, return_logits=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_loss_with_no_labels_and_under_no_grad():
    m = Model(ModelConfig(**SMALL))
    x = torch.randint(0, 256, (2, 8))
    _, loss, _ = m(x, labels=torch.full_like(x, -100))
    assert loss.item() == 0
    with torch.no_grad():
        logits, loss, _ = m(x, labels=x, return_logits=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()))


def test_log_probs_equal_log_softmax_and_backpropagate(monkeypatch):
    monkeypatch.setattr(M, "_chunk_rows", lambda vocab: 10)   # 5 time steps per chunk at B=2
    m = randomize(Model(ModelConfig(**SMALL)), 0.1)
    x = torch.randint(0, 256, (2, 13))
    y = torch.randint(0, 256, (2, 13))
    y[1, :4] = -100
    lp = m.log_probs(x, y, temperature=0.7)
    lp.sum().backward()
    ours = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = (m(x)[0] / 0.7).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    ref.sum().backward()
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    for g, p in zip(ours, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# Decoding, masking, generation

SCHEMES = {
    "gqa-rope": dict(),
    "mqa-nope": dict(n_kv_head=1, positions="none"),
    "mha-learned": dict(n_kv_head=4, positions="learned"),
    "rnope-qknorm": dict(nope_layers=(1,), qk_norm=True),
    "partial-yarn": dict(partial_rotary_factor=0.5, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                   "original_max_position_embeddings": 16}),
    "mla": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12),
    "mla-qlora-eager": dict(attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                            qk_nope_head_dim=16, v_head_dim=12, attn_impl="eager"),
    # Mamba-2 layers (ssm.py): chunks of 4 tokens, so prompts and documents span several
    "hybrid": dict(mixers="MAM", ssm_head_dim=16, ssm_state=8, ssm_groups=2, ssm_chunk=4),
    "mamba2": dict(mixers="MMM", ffns=("none",) * 3, positions="none", ssm_head_dim=32, ssm_state=8, ssm_chunk=4),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cached_greedy_decoding_equals_rerunning_the_full_forward(scheme):
    m = randomize(Model(ModelConfig(**{**SMALL, **SCHEMES[scheme]})).eval(), 0.3)
    prompt = [5, 17, 99, 3, 42]
    cached = m.generate([prompt], max_new_tokens=12, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(m(torch.tensor([seq]))[0][0, -1, :256].argmax().item())
    assert cached == seq[len(prompt):]
    assert len(set(cached)) > 1      # a real test: the model does not just repeat one token


@pytest.mark.parametrize("scheme", ["gqa-rope", "mha-learned", "mla", "hybrid", "mamba2"])
def test_batched_prompts_of_different_lengths_decode_as_each_alone(scheme):
    m = randomize(Model(ModelConfig(**{**SMALL, **SCHEMES[scheme]})).eval(), 0.3)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [77]]
    together = m.generate(prompts, max_new_tokens=6, temperature=0)
    assert together == [m.generate([p], max_new_tokens=6, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("scheme", ["gqa-rope", "mha-learned", "mla", "hybrid", "mamba2"])
def test_document_masking_equals_each_document_alone(scheme):
    m = randomize(Model(ModelConfig(**{**SMALL, **SCHEMES[scheme]})).eval(), 0.3)
    lengths = [5, 9, 3]
    x = torch.randint(0, 256, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = m(x, position_ids=pos)[0]
        alone = torch.cat([m(part)[0] for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)   # logits of size ~10


def test_generate_stops_at_stop_ids_and_respects_max_seq_len():
    m = randomize(Model(ModelConfig(**SMALL)).eval(), 0.3)
    free = m.generate([[1, 2], [3]], max_new_tokens=10, temperature=0)
    stop = free[0][3]
    out = m.generate([[1, 2], [3]], max_new_tokens=10, temperature=0, stop_ids=[stop])
    assert out[0] == free[0][:free[0].index(stop) + 1]
    assert out[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])
    with pytest.raises(ValueError, match="max_seq_len=128"):
        m.generate([[1] * 100], max_new_tokens=29)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate([[1], []])


def test_generated_tokens_stay_inside_the_real_vocabulary():
    m = randomize(Model(ModelConfig(**{**SMALL, "vocab_size": 130})).eval(), 0.3)   # padded to 256
    out = m.generate([[1, 2, 3]] * 4, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert max(max(o) for o in out) < 130


def test_sampling_draws_each_token_at_its_probability():
    """model.sample's inverse-CDF draw against the distribution itself (and torch.multinomial's
    frequencies, the usual sampler): a chi-square-sized tolerance on 200,000 draws, a token of
    probability 0 never drawn, the same generator seed the same tokens."""
    p = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.0, 0.5])
    logits = p.log().repeat(200_000, 1)                    # log 0 = -inf: probability exactly 0
    tokens = M.sample(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, p.double(), atol=4e-3)
    reference = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(freq, torch.bincount(reference, minlength=6).double() / 200_000, atol=6e-3)
    again = M.sample(logits[:100], generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, M.sample(logits[:100], generator=torch.Generator().manual_seed(1)))
    first = torch.tensor([[0.0, float("-inf"), float("-inf")]]).repeat(50, 1)   # one possible token
    assert M.sample(first, generator=torch.Generator().manual_seed(0)).eq(0).all()
    last = torch.tensor([[float("-inf"), float("-inf"), 0.0]]).repeat(50, 1)
    assert M.sample(last, generator=torch.Generator().manual_seed(0)).eq(2).all()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert M.sample(logits[:2], temperature=0).tolist() == [1, 1]
    assert set(M.sample(logits, top_k=2, generator=g).tolist()) == {1, 2}
    p = logits[0].softmax(-1)             # 0.64, 0.23, 0.09, ...: top-p 0.8 keeps tokens 1 and 2
    assert p[1] < 0.8 <= p[1] + p[2]
    tokens = M.sample(logits, top_p=0.8, generator=g)
    assert set(tokens.tolist()) == {1, 2}
    share = (tokens == 1).float().mean().item()
    assert share == pytest.approx((p[1] / (p[1] + p[2])).item(), abs=0.03)   # renormalised, not flattened
    cold = M.sample(logits, temperature=0.25, generator=g)
    assert (cold == 1).float().mean() > 0.95


# -----------------------------------------------------------------------------
# Errors and the demo

def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"n_kv_head.*n_head \(6\) must be divisible by n_kv_head \(4\)"):
        ModelConfig(n_head=6, n_kv_head=4, dim=384)
    with pytest.raises(ValueError, match="positions"):
        ModelConfig(positions="alibi")
    with pytest.raises(ValueError, match="nope_layers"):
        ModelConfig(n_layer=2, nope_layers=(5,))
    with pytest.raises(ValueError, match="mixers.*'mamba'"):
        ModelConfig(n_layer=2, mixers=("attention", "mamba"))
    with pytest.raises(ValueError, match=r"mixers.*A \(attention\) and M \(Mamba-2\), got 'AX'"):
        ModelConfig(n_layer=2, mixers="AX")
    with pytest.raises(ValueError, match="ssm_groups.*ssm_heads \\(8\\) must be divisible by ssm_groups \\(3\\)"):
        ModelConfig(n_layer=2, dim=256, mixers="MA", ssm_groups=3)
    with pytest.raises(ValueError, match="ssm_heads.*2 \\* dim \\(200\\) is not divisible by ssm_head_dim \\(64\\)"):
        ModelConfig(n_layer=2, dim=100, n_head=4, n_kv_head=2, mixers="MA")
    with pytest.raises(ValueError, match="ffns.*3 entries for 2 layers"):
        ModelConfig(n_layer=2, ffns=("dense",) * 3)
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*tiny"):
        preset("gpt5")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    for scaling in (yarn, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}):
        with pytest.raises(ValueError, match="ModelConfig.rope_scaling: yarn with attention='mla'"):
            ModelConfig(attention="mla", rope_scaling=scaling)
    ModelConfig(rope_scaling=yarn)                                      # GQA takes it


def test_sequence_longer_than_the_model_supports():
    m = Model(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="129 tokens is longer than max_seq_len=128"):
        m(torch.zeros(1, 129, dtype=torch.long))


def test_tiny_preset_trains():
    """A few steps of AdamW on a repeated sentence: the loss must fall well below ln(vocab)."""
    m = Model(preset("tiny", n_layer=2, nope_layers=(1,)))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.arange(33)[None].repeat(4, 1) * 7 % 4096
    for _ in range(30):
        _, loss, _ = m(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * math.log(4096)


def test_demo(capsys):
    M._demo()
    out = capsys.readouterr().out
    assert "134,515,008" in out and "3,075,098,624" in out and "greedy" in out


# -----------------------------------------------------------------------------
# The Triton RMSNorm kernel (run by Triton's interpreter on machines without CUDA)

@pytest.mark.parametrize("shape", [(3, 7, 48), (5, 33), (1, 1, 64), (301, 16)])   # 301 rows: blocks of 2 rows
def test_triton_rms_norm_equals_the_reference(shape, kernels):
    from attention import RMSNorm as Reference
    ref = Reference(shape[-1], eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape[-1]))
    x = (torch.randn(*shape) * 3).requires_grad_()
    g = torch.randn(*shape)
    ref(x).backward(g)
    want = [ref(x).detach(), x.grad.clone(), ref.weight.grad.clone()]
    kernels.poison()
    x, w = (t.detach().to(kernels.device).requires_grad_() for t in (x, ref.weight))
    y = M.RMSNormFunction.apply(x, w, ref.eps)
    y.backward(g.to(kernels.device))
    for got, expected in zip([y.detach(), x.grad, w.grad], want):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_model_norms_use_the_kernel_class_with_reference_names():
    m = Model(ModelConfig(**SMALL))
    assert isinstance(m.norm, M.RMSNorm) and isinstance(m.layers[0].input_layernorm, M.RMSNorm)
    assert "layers.0.input_layernorm.weight" in m.state_dict()


@pytest.mark.parametrize("V,z_coef,block", [(300, 0.0, 64), (300, 1e-2, 64), (64, 0.1, 64), (256, 0.0, 4096)])
def test_triton_cross_entropy_rows_equal_the_formula(V, z_coef, block, kernels, monkeypatch):
    """Per-row ce and lse, and the gradient written over the logits, against autograd on the
    plain formula; ignored rows give 0; vocabularies that are not a multiple of the tile."""
    triton = pytest.importorskip("triton")
    logits = torch.randn(7, V) * 3
    y = torch.randint(0, V, (7,))
    y[2] = -100
    valid = y != -100
    x = logits.clone().requires_grad_()
    lse = x.logsumexp(-1)
    ce = torch.where(valid, lse - x.gather(1, y.clamp(min=0)[:, None]).squeeze(1), torch.zeros(7))
    (ce.sum() + z_coef * lse[valid].pow(2).sum()).backward()
    kernels.poison()
    monkeypatch.setattr(triton, "next_power_of_2", lambda v: block)   # force several tiles
    buf = logits.clone().to(kernels.device)
    got_ce, got_lse = M.cross_entropy_rows(buf, y.to(kernels.device), z_coef, grad=True)
    torch.testing.assert_close(got_ce.cpu(), ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse.cpu(), lse.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf.cpu(), x.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(buf[2].cpu(), torch.zeros(V))


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_model_loss_with_the_kernels_on_equals_the_reference(z_loss, kernels):
    """The whole model with both kernels (RMSNorm, cross-entropy) on: loss, logged terms and
    every gradient equal the PyTorch path on the CPU."""
    m = randomize(Model(ModelConfig(**SMALL, z_loss=z_loss)), 0.1)
    x = torch.randint(0, 256, (2, 9))
    y = torch.randint(0, 256, (2, 9))
    y[0, :3] = -100
    _, ref, ref_aux = m(x, labels=y)
    ref.backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    kernels.on()
    m = m.to(kernels.device)
    _, loss, aux = m(x.to(kernels.device), labels=y.to(kernels.device))
    loss.backward()
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["row_ce"].cpu(), ref_aux["row_ce"], rtol=1e-5, atol=1e-6)
    for g, p in zip(want, m.parameters()):
        torch.testing.assert_close(p.grad.cpu(), g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scheme", ["gqa-rope", "mla", "hybrid"])
def test_model_with_flash_attention_equals_sdpa(scheme, kernels, monkeypatch):
    """attn_impl="triton" with every kernel on (flash attention, RMSNorm, cross-entropy, and for
    the hybrid the SSD scan) against the sdpa model with the same weights and no kernels, on packed documents: loss and every gradient; then
    cached decoding, where the kernel hands over to sdpa."""
    cfg = {**SMALL, **SCHEMES[scheme]}
    if scheme == "hybrid":
        # Triton's interpreter runs each program in Python, and the SSD kernels launch programs
        # per head: 4 heads of 32 channels (two 16-wide tiles each) instead of 8 of 16 take 2/3
        # of the time, and still share each of the 2 groups between heads, over 10 chunks of 4
        cfg["ssm_head_dim"] = 32
    ref = randomize(Model(ModelConfig(**cfg, attn_impl="sdpa")), 0.3)
    m = Model(ModelConfig(**cfg, attn_impl="triton"))
    m.load_state_dict(ref.state_dict())
    x = torch.randint(0, 256, (2, 40))
    pos = torch.cat([torch.arange(11), torch.arange(25), torch.arange(4)]).expand(2, 40)
    _, want, _ = ref(x[:, :-1], labels=x[:, 1:], position_ids=pos[:, :-1])
    want.backward()
    kernels.on()
    kernels.small_tiles()
    m, x, pos = m.to(kernels.device), x.to(kernels.device), pos.to(kernels.device)
    _, loss, _ = m(x[:, :-1], labels=x[:, 1:], position_ids=pos[:, :-1])
    loss.backward()
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-5, atol=1e-6)
    # float32 sums in another order: within 1e-5 of the gradient's own scale. The Mamba-2 layers'
    # gradients are noisier in float32 (sums of products of decays): measured against float64,
    # the PyTorch path and the kernels are each about 2e-5 of the scale away, so 4e-5 there.
    scale = 4e-5 if "mixers" in SCHEMES[scheme] else 1e-5
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=scale * q.grad.abs().max().item(),
                                   msg=lambda s: f"{name}: {s}")
    prompts = [[5, 17, 99, 3, 42], [7]]
    assert m.eval().generate(prompts, 8, temperature=0) == ref.eval().generate(prompts, 8, temperature=0)


def test_rms_norm_and_cross_entropy_kernels_in_half_precision(kernels):
    """fp16 in and out (bf16 dots are wrong in Triton 3.9's interpreter; fp16 exercises the
    same casts): within half precision of the float32 formulas."""
    from attention import RMSNorm as Reference
    dev = kernels.device
    x, w = torch.randn(6, 48).half(), (torch.randn(48) * 0.5 + 1).half()
    ref = Reference(48, eps=1e-6)
    torch.testing.assert_close(M.RMSNormFunction.apply(x.to(dev), w.to(dev), 1e-6).float().cpu(),
                               ref(x.float()) * w.float(), rtol=1e-2, atol=1e-2)
    logits, y = (torch.randn(5, 300) * 3).half(), torch.randint(0, 300, (5,))
    grad = logits.clone().to(dev)
    ce, lse = M.cross_entropy_rows(grad, y.to(dev), 1e-2, grad=True)
    ce, lse, grad = ce.cpu(), lse.cpu(), grad.cpu()
    lf = logits.float().requires_grad_()
    want_lse = lf.logsumexp(-1)
    want_ce = want_lse - lf.gather(1, y[:, None]).squeeze(1)
    (want_ce.sum() + 1e-2 * want_lse.pow(2).sum()).backward()
    torch.testing.assert_close(ce, want_ce.detach(), rtol=1e-3, atol=1e-3)   # fp32 accumulation
    torch.testing.assert_close(lse, want_lse.detach(), rtol=1e-3, atol=1e-3)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad.float(), lf.grad, rtol=1e-2, atol=1e-4)


def test_deepseek_v3_multi_token_prediction_layers_are_skipped(tmp_path, capsys):
    # DeepSeek-V3's checkpoints store the MTP module as a layer past the last; transformers
    # does not build it, and neither do we: the loader says how many tensors it left out.
    from safetensors.torch import load_file, save_file
    theirs = hf_model("deepseek-v3")
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    state["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    ours = Model.from_pretrained(tmp_path).eval()
    assert "skipping 2 tensors of the multi-token-prediction layers" in capsys.readouterr().out
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max() < 1e-4
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match="unexpected keys"):   # without the flag they are an error
        Model.from_pretrained(tmp_path)

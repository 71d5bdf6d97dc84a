"""Lesson 05 against the reference: transformers' Gemma modules with the same weights, float32, atol 1e-5.

On a multi-query config (4 query heads, 1 key/value head) and a grouped-query one
(4 query heads, 2 key/value heads), under a prefix-LM mask with padding."""

import pytest
import torch

from nanopali.bridge import prefix_lm_mask
from nanopali.decoder import GemmaAttention, GemmaConfig, GemmaDecoderLayer, GemmaMLP, GemmaRMSNorm, repeat_kv
from nanopali.exercises.lesson05 import check_grouped_attention, check_prompts_that_fit
from nanopali.rope import GemmaRotaryEmbedding

from conftest import reference_gemma_config

transformers = pytest.importorskip("transformers")
from transformers.models.gemma import modeling_gemma  # noqa: E402

ATOL = 1e-5
CONFIGS = {"multi-query": GemmaConfig.tiny(), "grouped-query": GemmaConfig.tiny(num_key_value_heads=2)}


reference_config = reference_gemma_config


def randomise(module):
    "Non-trivial weights everywhere, norms included (a fresh RMSNorm weight is all zeros)."
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return module.eval()


def inputs(cfg):
    "Two sequences, the first left-padded by 3, prefix of 7 then suffix, with RoPE tables and the mask."
    torch.manual_seed(1)
    x = torch.randn(2, 12, cfg.hidden_size)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 7:] = 1
    positions = torch.arange(12)[None].expand(2, 12)
    cos, sin = GemmaRotaryEmbedding(cfg.head_dim, cfg.rope_theta)(x, positions)
    return x, cos, sin, prefix_lm_mask(types, attention_mask)


def additive(mask):
    "The reference takes a float mask added to the scores: 0 where allowed, the lowest float where not."
    return torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]


def test_rmsnorm_equals_reference():
    ours, ref = randomise(GemmaRMSNorm(64)), modeling_gemma.GemmaRMSNorm(64)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = 5 * torch.randn(3, 7, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)
    xb = x.bfloat16()
    assert torch.equal(ours(xb), ref(xb))  # float32 inside, the same rounding at the end


def test_mlp_equals_reference():
    cfg = GemmaConfig.tiny()
    ours = randomise(GemmaMLP(cfg))
    ref = modeling_gemma.GemmaMLP(reference_config(cfg)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, cfg.hidden_size)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", ["explicit", "sdpa"])
def test_attention_equals_reference(name, path):
    cfg = CONFIGS[name]
    ours = randomise(GemmaAttention(cfg))
    ref = modeling_gemma.GemmaAttention(reference_config(cfg, "eager" if path == "explicit" else "sdpa"), 0).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, cos, sin, mask = inputs(cfg)
    with torch.no_grad():
        expected, expected_weights = ref(x, position_embeddings=(cos, sin), attention_mask=additive(mask))
        got, weights = ours(x, cos, sin, mask, return_attention=path == "explicit")
    real = mask.any(-1)  # every query row sees something, so every output is defined
    assert real.all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if path == "explicit":
        torch.testing.assert_close(weights, expected_weights, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", ["explicit", "sdpa"])
def test_decoder_layer_equals_reference(name, path):
    cfg = CONFIGS[name]
    ours = randomise(GemmaDecoderLayer(cfg))
    ref = modeling_gemma.GemmaDecoderLayer(reference_config(cfg, "eager" if path == "explicit" else "sdpa"), 0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    x, cos, sin, mask = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, attention_mask=additive(mask), position_embeddings=(cos, sin))
        got, _ = ours(x, cos, sin, mask, return_attention=path == "explicit")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_repeat_kv_equals_reference():
    x = torch.randn(2, 3, 5, 8)
    assert torch.equal(repeat_kv(x, 4), modeling_gemma.repeat_kv(x, 4))
    assert repeat_kv(x, 1) is x


def test_real_layer_parameter_count_and_names():
    cfg = GemmaConfig.paligemma_3b()
    with torch.device("meta"):
        ours = GemmaDecoderLayer(cfg)
        ref = modeling_gemma.GemmaDecoderLayer(reference_config(cfg), 0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert 18 * sum(p.numel() for p in ours.parameters()) == 1_981_882_368


def test_defaults_are_the_reference_defaults():
    ref, ours = transformers.GemmaConfig(), GemmaConfig()
    for field in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                  "attention_bias", "pad_token_id", "eos_token_id", "bos_token_id"]:
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]


def test_config_refuses_heads_that_do_not_group():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads 3"):
        GemmaConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        GemmaMLP(GemmaConfig.tiny(hidden_act="relu"))


@pytest.mark.parametrize("bad, says", [
    (dict(rope_theta=0.0), "rope_theta must be a positive, finite number, got 0.0"),
    (dict(rope_theta=-10000.0), "rope_theta must be a positive, finite number, got -10000.0"),
    (dict(rope_theta=float("nan")), "rope_theta must be a positive, finite number, got nan"),
    (dict(rope_theta=float("inf")), "rope_theta must be a positive, finite number, got inf"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive, finite number, got 0.0"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a positive, finite number, got -1e-06"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive, finite number, got nan"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a positive, finite number, got inf"),
    (dict(eos_token_id=1536), r"eos_token_id 1536 is not a token of the vocabulary \(ids 0 to 1535\)"),
    (dict(eos_token_id=-1), r"eos_token_id -1 is not a token of the vocabulary \(ids 0 to 1535\)"),
    (dict(pad_token_id=5000), r"pad_token_id 5000 is not a token of the vocabulary \(ids 0 to 1535\)"),
    (dict(bos_token_id=-2), r"bos_token_id -2 is not a token of the vocabulary \(ids 0 to 1535\)"),
])
def test_config_refuses_values_that_would_answer_wrongly_or_never_stop(bad, says):
    with pytest.raises(ValueError, match=says) as refused:
        GemmaConfig.tiny(**bad)
    assert "\n" not in str(refused.value)  # one line


def test_config_accepts_the_edges_of_the_vocabulary_and_tiny_positive_values():
    cfg = GemmaConfig.tiny(eos_token_id=1535, pad_token_id=0, rope_theta=1e-3, rms_norm_eps=1e-30)
    assert (cfg.eos_token_id, cfg.rms_norm_eps) == (1535, 1e-30)
    GemmaConfig()  # the reference defaults
    GemmaConfig.paligemma_3b()


# Lesson 05's exercises: each check accepts a right answer and refuses plausible wrong ones.


def _prompts_that_fit(config, memory_bytes, num_params, prompt_tokens, max_new_tokens, dtype, factor=2, heads=None,
                      answer=True, weights=True, round_up=False):
    size = torch.tensor([], dtype=dtype).element_size()
    heads = config.num_key_value_heads if heads is None else getattr(config, heads)
    positions = prompt_tokens + (max_new_tokens if answer else 0)
    per_prompt = factor * config.num_hidden_layers * heads * config.head_dim * positions * size
    free = memory_bytes - (num_params * size if weights else 0)
    return max(0, -(-free // per_prompt) if round_up else free // per_prompt)


def test_prompts_that_fit_check_accepts_the_count_and_refuses_common_slips(capsys):
    assert check_prompts_that_fit(_prompts_that_fit)
    assert "31 MHA, 127 GQA (2 kv heads), 255 MQA" in capsys.readouterr().out
    slips = {"keys AND values": dict(factor=1), "not the query heads": dict(heads="num_attention_heads"),
             "room for the answer too": dict(answer=False), "weights take their share": dict(weights=False),
             "round down": dict(round_up=True)}
    for message, slip in slips.items():
        assert not check_prompts_that_fit(lambda *a, slip=slip: _prompts_that_fit(*a, **slip))
        assert message in capsys.readouterr().out
    negative = lambda c, m, n, p, a, dtype: (m - 2 * n) // 1000  # noqa: E731
    assert not check_prompts_that_fit(negative)
    assert not check_prompts_that_fit(  # dtype ignored
        lambda c, m, n, p, a, dtype: _prompts_that_fit(c, m, n, p, a, torch.bfloat16))


def _grouped_attention(q, k, v, mask=None, strided=False, scale=True, fill=float("-inf")):
    B, H, L, d = q.shape
    G = k.shape[1]
    if strided:  # the wrong grouping: head h with key/value head h % G
        q = q.view(B, H // G, G, L, d).transpose(1, 2)
    else:
        q = q.view(B, G, H // G, L, d)
    scores = q @ k[:, :, None].transpose(-2, -1) * (d**-0.5 if scale else 1.0)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], fill)
    out = scores.softmax(-1) @ v[:, :, None]
    if strided:
        out = out.transpose(1, 2)
    return out.reshape(B, H, L, d)


def test_grouped_attention_check_accepts_the_grouping_and_refuses_wrong_ones(capsys):
    assert check_grouped_attention(_grouped_attention)
    assert not check_grouped_attention(lambda *a: _grouped_attention(*a, strided=True))
    assert "query head h used key/value head h % 2; it should use h // 3" in capsys.readouterr().out
    assert not check_grouped_attention(lambda *a: _grouped_attention(*a, scale=False))
    assert "scale 1 / sqrt(head_dim) is missing" in capsys.readouterr().out
    assert not check_grouped_attention(lambda q, k, v, mask=None: _grouped_attention(q, k, v))  # mask ignored
    out = capsys.readouterr().out
    assert "right without a mask, wrong with the causal one (your result is the unmasked one" in out
    zero_filled = lambda q, k, v, mask=None: _grouped_attention(q, k, v, mask, fill=0.0)  # noqa: E731
    assert not check_grouped_attention(zero_filled)  # 0 instead of -inf where the mask is False
    out = capsys.readouterr().out
    assert "right without a mask, wrong with the causal one:" in out and "must be -inf" in out

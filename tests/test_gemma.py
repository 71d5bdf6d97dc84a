"""Lesson 06 against the reference: transformers' GemmaForCausalLM with the same weights.

Logits equal to 1e-5 in float32 (multi-query and grouped-query, with left padding),
greedy generation token for token equal to its generate(), cached decoding equal to
full recomputation, and the sampling rules."""

import numpy as np
import pytest
import torch

from nanopali.decoder import GemmaConfig
from nanopali.exercises.lesson06 import check_generate_with_penalty, check_min_p_filter, check_repetition_penalty
from nanopali.gemma import GemmaForCausalLM, KVCache, generate_tokens, sample_next_token

from conftest import reference_gemma_config

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
CONFIGS = {"multi-query": GemmaConfig.tiny(), "grouped-query": GemmaConfig.tiny(num_key_value_heads=2)}


reference_config = reference_gemma_config


def twin(cfg, attn_implementation="eager", std=0.3):
    "Ours and the reference with the same random weights, large enough that outputs vary with the input."
    torch.manual_seed(0)
    ours = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(std * torch.randn_like(p))
    ref = transformers.GemmaForCausalLM(reference_config(cfg, attn_implementation)).eval()
    state = dict(ours.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the reference's tied head
    ref.load_state_dict(state, strict=True)
    return ours, ref


def padded_prompts():
    input_ids = torch.tensor([[2, 300, 301, 302, 303, 304, 305], [0, 0, 0, 2, 310, 311, 312]])
    attention_mask = (input_ids != 0).long()
    return input_ids, attention_mask


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_equal_reference(name, attn_implementation):
    ours, ref = twin(CONFIGS[name], attn_implementation)
    input_ids, attention_mask = padded_prompts()
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids, attention_mask=attention_mask)
        got_explicit, _ = ours(input_ids, attention_mask=attention_mask, return_attention=True)
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_explicit[real], expected[real], atol=ATOL, rtol=0)
    assert torch.isfinite(got).all(), "padding rows must not produce NaN"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_equals_reference_generate(name):
    ours, ref = twin(CONFIGS[name])
    input_ids, attention_mask = padded_prompts()
    expected = ref.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                            pad_token_id=0, eos_token_id=1)[:, input_ids.shape[1]:]
    got = generate_tokens(ours, ours.model.embed(input_ids), attention_mask, max_new_tokens=12)
    assert len(set(got.flatten().tolist())) > 4, "the weights should not make every token the same"
    assert got.tolist() == expected[:, :got.shape[1]].tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cached_decoding_equals_full_recompute_at_every_step(name, dtype, atol):
    """In float64 the two agree to rounding (1e-10): the cache changes nothing. In float32 one token against the
    cache sums in another order than the full sequence does, which shows at ~2e-5 on logits of size ~10."""
    ours, _ = twin(CONFIGS[name])
    ours = ours.to(dtype)
    input_ids, attention_mask = padded_prompts()
    types = torch.zeros_like(input_ids)  # a prefix-LM prompt, as PaliGemma's
    extra = torch.tensor([[400, 401, 402, 403], [410, 411, 412, 413]])
    full_ids = torch.cat([input_ids, extra], 1)
    full_mask = torch.cat([attention_mask, torch.ones_like(extra)], 1)
    full_types = torch.cat([types, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(full_ids, attention_mask=full_mask, token_type_ids=full_types)
        cache = KVCache(ours.config, 2, full_ids.shape[1], dtype=dtype)
        L = input_ids.shape[1]
        steps = [ours(input_ids, attention_mask=attention_mask, token_type_ids=types, kv_cache=cache)]
        for t in range(4):
            steps.append(ours(extra[:, t:t + 1], attention_mask=full_mask[:, :L + t + 1],
                              token_type_ids=full_types[:, :L + t + 1], kv_cache=cache))
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=atol, rtol=0)


def test_generation_with_and_without_cache_is_the_same():
    ours, _ = twin(CONFIGS["grouped-query"])
    input_ids, attention_mask = padded_prompts()
    embeds = ours.model.embed(input_ids)
    with_cache = generate_tokens(ours, embeds, attention_mask, max_new_tokens=10)
    without = generate_tokens(ours, embeds, attention_mask, max_new_tokens=10, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("use_cache", [True, False])
def test_attention_returned_by_generation_equals_the_reference_attention(use_cache):
    "Row j is the attention of the position that chose token j: the reference's, on the whole sequence at once."
    ours, ref = twin(CONFIGS["grouped-query"])
    input_ids, attention_mask = padded_prompts()
    embeds = ours.model.embed(input_ids)
    plain = generate_tokens(ours, embeds, attention_mask, max_new_tokens=6, use_cache=use_cache)
    tokens, rows = generate_tokens(ours, embeds, attention_mask, max_new_tokens=6, use_cache=use_cache,
                                   return_attention=True)
    assert torch.equal(tokens, plain)
    L, n = input_ids.shape[1], tokens.shape[1]
    assert len(rows) == n
    full_ids = torch.cat([input_ids, tokens], dim=1)
    full_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        reference = ref(input_ids=full_ids, attention_mask=full_mask, output_attentions=True).attentions
    for j, row in enumerate(rows):
        assert row.shape == (2, ours.config.num_hidden_layers, ours.config.num_attention_heads, L + j)
        assert row.dtype == torch.float32
        torch.testing.assert_close(row.sum(-1), torch.ones(row.shape[:-1]), atol=1e-6, rtol=0)
        expected = torch.stack([a[:, :, L - 1 + j, : L + j] for a in reference], dim=1)
        torch.testing.assert_close(row, expected, atol=ATOL, rtol=0)


def test_last_only_keeps_only_the_last_rows_of_the_attention():
    ours, _ = twin(CONFIGS["grouped-query"])
    input_ids, attention_mask = padded_prompts()
    with torch.no_grad():
        logits, full = ours(input_ids, attention_mask, return_attention=True)
        last_logits, last = ours(input_ids, attention_mask, last_only=True, return_attention=True)
    torch.testing.assert_close(last_logits, logits[:, -1:], atol=1e-5, rtol=0)  # large logits (weights std 0.3)
    for f, w in zip(full, last):
        assert w.shape == (2, 4, 1, input_ids.shape[1])
        torch.testing.assert_close(w, f[:, :, -1:], atol=1e-6, rtol=0)


def test_generation_stops_at_eos_and_pads_finished_rows():
    ours, _ = twin(CONFIGS["multi-query"])
    with torch.no_grad():  # make <eos> (id 1) the best next token after token 305 only
        ours.model.embed_tokens.weight[1] = 0
    input_ids, attention_mask = padded_prompts()
    got = generate_tokens(ours, ours.model.embed(input_ids), attention_mask, max_new_tokens=6)
    for row in got.tolist():
        if 1 in row:
            assert all(t == 0 for t in row[row.index(1) + 1:])


def test_seeded_sampling_is_reproducible():
    ours, _ = twin(CONFIGS["multi-query"])
    input_ids, attention_mask = padded_prompts()
    embeds = ours.model.embed(input_ids)
    runs = [generate_tokens(ours, embeds, attention_mask, max_new_tokens=8, do_sample=True, temperature=1.5,
                            seed=seed) for seed in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_k_1_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next_token(logits, True, top_k=1), logits.argmax(-1))
    ours, _ = twin(CONFIGS["multi-query"])
    input_ids, attention_mask = padded_prompts()
    embeds = ours.model.embed(input_ids)
    assert torch.equal(generate_tokens(ours, embeds, attention_mask, max_new_tokens=6, do_sample=True, top_k=1, seed=0),
                       generate_tokens(ours, embeds, attention_mask, max_new_tokens=6))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)
    cases = [(0.5, {0}), (0.6, {0, 1}), (0.75, {0, 1}), (0.76, {0, 1, 2}), (0.9, {0, 1, 2}), (1.0, set(range(5)))]
    for p, kept in cases:
        draws = {sample_next_token(logits, True, top_p=p, generator=generator).item() for _ in range(400)}
        assert draws == kept, (p, draws)


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, True, top_k=2, generator=generator).item() for _ in range(300)}
    assert draws == {1, 2}


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number, at least 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number, got 2.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be a whole number, got True"),
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0 when sampling, got 0"),
    ({"do_sample": True, "temperature": -1.0}, "temperature must be > 0 when sampling, got -1"),
    ({"do_sample": True, "temperature": 1e-300}, "must be finite and at least 0.001 when sampling, got 1e-300"),
    ({"do_sample": True, "temperature": float("inf")}, "must be finite and at least 0.001 when sampling, got inf"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature must be a number, got nan"),
    ({"do_sample": True, "temperature": "0.7"}, "temperature must be a number, got '0.7'"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
    ({"do_sample": True, "top_p": float("nan")}, "top_p must be a number, got nan"),
    ({"do_sample": True, "top_k": 2.5}, "top_k must be a whole number, got 2.5"),
    ({"do_sample": True, "seed": 2**64}, r"seed must be between -2\*\*63 and 2\*\*64 - 1"),
    ({"do_sample": True, "seed": 1.5}, "seed must be a whole number, got 1.5"),
    ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": 1.2}, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_k": 0}, "top_k must be at least 1"),
    ({"max_new_tokens": 510}, "the model's context is 512 tokens"),
])
def test_bad_settings_are_refused(settings, message):
    ours, _ = twin(CONFIGS["multi-query"])
    input_ids, attention_mask = padded_prompts()
    with pytest.raises(ValueError, match=message):
        generate_tokens(ours, ours.model.embed(input_ids), attention_mask, **settings)


def test_numpy_numbers_are_accepted_as_settings():
    "A count or a seed that came out of numpy is still a whole number: the same tokens as with Python's numbers."
    ours, _ = twin(CONFIGS["multi-query"])
    input_ids, attention_mask = padded_prompts()
    embeds = ours.model.embed(input_ids)
    plain = generate_tokens(ours, embeds, attention_mask, max_new_tokens=4, do_sample=True, temperature=0.8,
                            top_k=5, top_p=0.9, seed=7)
    numpy = generate_tokens(ours, embeds, attention_mask, max_new_tokens=np.int64(4), do_sample=True,
                            temperature=np.float32(0.8), top_k=np.int64(5), top_p=np.float64(0.9), seed=np.uint64(7))
    assert torch.equal(plain, numpy)


def test_extreme_but_valid_settings_sample_without_error():
    ours, _ = twin(CONFIGS["multi-query"])
    input_ids, attention_mask = padded_prompts()
    embeds = ours.model.embed(input_ids)
    for settings in ({"temperature": 1e-3}, {"temperature": 1e6}, {"seed": 2**64 - 1}, {"seed": -(2**63)}):
        tokens = generate_tokens(ours, embeds, attention_mask, max_new_tokens=3, do_sample=True, **settings)
        assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 3


def test_prompt_longer_than_the_context_is_refused():
    ours, _ = twin(CONFIGS["multi-query"])
    long = torch.full((1, 513), 300)
    with pytest.raises(ValueError, match="the prompt has 513 tokens"):
        generate_tokens(ours, ours.model.embed(long), max_new_tokens=1)


def test_a_full_cache_says_so():
    ours, _ = twin(CONFIGS["multi-query"])
    cache = KVCache(ours.config, 1, 4)
    with pytest.raises(ValueError, match="holds 4 tokens and is full"):
        ours(torch.tensor([[2, 300, 301, 302, 303]]), kv_cache=cache)


def test_real_text_model_shapes():
    with torch.device("meta"):
        model = GemmaForCausalLM(GemmaConfig.paligemma_3b())
        logits = model(torch.zeros(1, 266, dtype=torch.long), last_only=True)
    assert logits.shape == (1, 1, 257216)
    assert sum(p.numel() for p in model.parameters()) == 526_778_368 + 1_981_882_368 + 2048


def test_a_mask_that_does_not_cover_the_cached_tokens_is_refused():
    ours, _ = twin(CONFIGS["multi-query"])
    cache = KVCache(ours.config, 1, 8)
    ours(torch.tensor([[2, 300, 301]]), kv_cache=cache)
    with pytest.raises(ValueError, match=r"3 tokens are cached and 1 are new: it must cover the whole sequence"):
        ours(torch.tensor([[302]]), attention_mask=torch.ones(1, 1, dtype=torch.long), kv_cache=cache)


def test_right_padded_prompts_and_empty_prompts_are_refused():
    ours, _ = twin(CONFIGS["multi-query"])
    embeds = ours.model.embed(torch.tensor([[2, 300, 301, 0]]))
    with pytest.raises(ValueError, match="padded on the left"):
        generate_tokens(ours, embeds, torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_tokens(ours, embeds[:, :0])


def test_sampling_refuses_nan_temperature_and_wrong_logit_shapes():
    with pytest.raises(ValueError, match="temperature must be a number, got nan"):
        sample_next_token(torch.zeros(1, 5), True, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, vocab\), got \(2, 1, 5\)"):
        sample_next_token(torch.zeros(2, 1, 5))


def test_a_cache_made_for_another_batch_size_says_so():
    ours, _ = twin(CONFIGS["multi-query"])
    with pytest.raises(ValueError, match="made for a batch of 1, got 2"):
        ours(torch.tensor([[2, 300], [2, 301]]), kv_cache=KVCache(ours.config, 1, 8))


# Lesson 06's exercises: each check accepts a right answer and refuses plausible wrong ones.


def _penalty(logits, previous, penalty):
    seen = logits.gather(-1, previous)
    return logits.scatter(-1, previous, torch.where(seen > 0, seen / penalty, seen * penalty))


def _penalty_divides_all(logits, previous, penalty):  # raises negative scores instead of lowering them
    return logits.scatter(-1, previous, logits.gather(-1, previous) / penalty)


def _penalty_per_occurrence(logits, previous, penalty):  # a token seen twice is penalised twice
    out = logits.clone()
    for row in range(previous.shape[0]):
        for token in previous[row].tolist():
            out[row, token] = out[row, token] / penalty if out[row, token] > 0 else out[row, token] * penalty
    return out


def _penalty_in_place(logits, previous, penalty):
    return logits.scatter_(-1, previous, _penalty(logits, previous, penalty).gather(-1, previous))


def test_repetition_penalty_check_accepts_the_rule_and_refuses_wrong_ones(capsys):
    assert check_repetition_penalty(_penalty)
    assert not check_repetition_penalty(_penalty_divides_all)
    assert "multiply negative scores" in capsys.readouterr().out
    assert not check_repetition_penalty(_penalty_per_occurrence)
    assert "penalised twice" in capsys.readouterr().out
    assert not check_repetition_penalty(_penalty_in_place)
    assert "input logits were changed" in capsys.readouterr().out


def _min_p(logits, min_p):
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def test_min_p_check_accepts_the_filter_and_refuses_wrong_ones(capsys):
    assert check_min_p_filter(_min_p)
    absolute = lambda logits, min_p: logits.masked_fill(logits.softmax(-1) < min_p, float("-inf"))  # noqa: E731
    assert not check_min_p_filter(absolute)  # not relative to the best token
    on_logits = lambda logits, min_p: logits.masked_fill(  # noqa: E731
        logits < min_p * logits.amax(-1, keepdim=True), float("-inf"))
    assert not check_min_p_filter(on_logits)  # raw logits, not probabilities
    assert "not right yet" in capsys.readouterr().out
    assert not check_min_p_filter(lambda logits, min_p: logits.softmax(-1))  # probabilities, not filtered logits
    assert "return logits, not probabilities" in capsys.readouterr().out


def test_min_p_check_names_in_place_filling_zeros_and_probabilities(capsys):
    in_place = lambda logits, min_p: logits.masked_fill_(  # noqa: E731
        logits.softmax(-1) < min_p * logits.softmax(-1).amax(-1, keepdim=True), float("-inf"))
    assert not check_min_p_filter(in_place)
    assert "input logits were changed" in capsys.readouterr().out
    zeros = lambda logits, min_p: logits.masked_fill(  # noqa: E731
        logits.softmax(-1) < min_p * logits.softmax(-1).amax(-1, keepdim=True), 0.0)
    probabilities = lambda logits, min_p: logits.softmax(-1).masked_fill(  # noqa: E731
        logits.softmax(-1) < min_p * logits.softmax(-1).amax(-1, keepdim=True), 0.0)
    for wrong in (zeros, probabilities):
        assert not check_min_p_filter(wrong)
        assert "dropped tokens must be -inf, not 0 (and return logits, not probabilities)" in capsys.readouterr().out


@torch.inference_mode()
def _generate_with_penalty(model, input_ids, max_new_tokens, penalty, feed_everything=False):
    cache = KVCache(model.config, 1, 100)
    logits = model(input_ids, kv_cache=cache, last_only=True)
    sequence = input_ids
    for step in range(max_new_tokens):
        token = _penalty(logits[:, -1], sequence, penalty).argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        if step < max_new_tokens - 1:
            logits = model(sequence if feed_everything else token, kv_cache=cache, last_only=True)
    return sequence[:, input_ids.shape[1]:]


def test_generate_with_penalty_check_reports_the_tokens_per_pass_first(capsys):
    assert check_generate_with_penalty(_generate_with_penalty)
    everything = lambda *a: _generate_with_penalty(*a, feed_everything=True)  # noqa: E731
    assert not check_generate_with_penalty(everything)  # the whole sequence, with the cache, at every step
    out = capsys.readouterr().out
    assert "fed the model [5, 6, 7" in out and "penalise" not in out
    assert not check_generate_with_penalty(lambda *a: _generate_with_penalty(*a[:3], 1.0))  # no penalty
    assert "penalise every token already in the sequence" in capsys.readouterr().out

"""Checks for lesson 05's exercises (notebooks/05_decoder.ipynb). Hand-written; solutions in
notebooks/solutions/05_decoder.ipynb."""

import dataclasses

import torch

from nanopali.decoder import GemmaAttention, GemmaConfig, repeat_kv
from nanopali.gemma import GemmaForCausalLM, KVCache
from nanopali.rope import GemmaRotaryEmbedding
from nanopali.siglip import eager_attention

from . import exercise

__all__ = ["check_prompts_that_fit", "check_grouped_attention", "check_pool_kv_heads"]

PALIGEMMA_3B_PARAMETERS = 2_923_466_480  # SigLIP, projector and Gemma (lesson 07)


@exercise("5.1")
def check_prompts_that_fit(prompts_that_fit) -> str:
    # the cache a tiny grouped-query model actually builds, in float32, for 1 prompt of 7 tokens and 5 new ones
    tiny = GemmaConfig.tiny(num_key_value_heads=2)
    with torch.random.fork_rng():  # a new model draws its weights: leave the learner's random state alone
        num_params = sum(p.numel() for p in GemmaForCausalLM(tiny).parameters())
    cache = KVCache(tiny, 1, 7 + 5)
    one = sum(t.nbytes for t in cache.keys + cache.values)
    weights = 4 * num_params
    budget = weights + 3 * one + one // 2  # room for 3.5 caches next to the weights
    got = prompts_that_fit(tiny, budget, num_params, 7, 5, torch.float32)
    assert got is not None and not isinstance(got, torch.Tensor), "return a whole number of prompts (an int)"
    if got == 4:
        raise AssertionError("4 prompts would need more memory than the budget: a prompt whose cache does not fit "
                             "whole does not fit (round down)")
    slips = {(3 * one + one // 2) // (one * 7 // 12): "the cache must have room for the answer too: "
             "prompt_tokens + max_new_tokens positions",
             (3 * one + one // 2) // (one // 2): "the cache holds keys AND values",
             budget // one: "the weights take their share of the memory first (num_params numbers in dtype)",
             (3 * one + one // 2) // (2 * one): "the cache holds the key/value heads (num_key_value_heads), not the "
             "query heads"}
    if got != 3 and got in slips:
        raise AssertionError(f"a tiny model's weights and room for 3.5 of its caches: you said {got} prompts, but it "
                             f"fits 3: {slips[got]}")
    assert got == 3, (f"a tiny grouped-query model (2 layers, 2 key/value heads of 16) in float32, with room for 3.5 "
                      f"caches of 12 positions ({one:,} bytes each) next to its weights: you said {got} prompts, "
                      "it fits 3")
    assert prompts_that_fit(tiny, weights // 2, num_params, 7, 5, torch.float32) == 0, \
        "when the weights alone exceed the memory, no prompt fits: return 0, not a negative number"
    real = GemmaConfig.paligemma_3b()
    answers = {}
    for name, heads in [("MHA", 8), ("GQA (2 kv heads)", 2), ("MQA", 1)]:
        config = dataclasses.replace(real, num_key_value_heads=heads)
        per_prompt = 2 * 18 * heads * 256 * (4106 + 128) * 2  # keys and values, layers, heads, head_dim, positions
        expected = (24 * 2**30 - 2 * PALIGEMMA_3B_PARAMETERS) // per_prompt
        got = prompts_that_fit(config, 24 * 2**30, PALIGEMMA_3B_PARAMETERS, 4106, 128, torch.bfloat16)
        assert got == expected, (f"PaliGemma 3B with {name} in bfloat16, 24 GiB, prompts of 896 px (4106 tokens) "
                                 f"and 128 new tokens: you said {got}, expected {expected}")
        answers[name] = expected
    return ("in 24 GiB next to PaliGemma 3B's weights, prompts of 896 px with 128 new tokens: " +
            ", ".join(f"{n} {name}" for name, n in answers.items()) + "; and the cache a tiny model builds")


def _close(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def _unscaled(q, k, v, mask):
    return eager_attention(q, k, v, mask=mask, scale=1.0)[0]


def _strided(q, k, v, mask):
    "The wrong grouping: query head h with key/value head h % G."
    H, G = q.shape[1], k.shape[1]
    order = torch.arange(H) % G
    return eager_attention(q, k[:, order], v[:, order], mask=mask)[0]


@exercise("5.2")
def check_grouped_attention(grouped_attention) -> str:
    generator = torch.Generator().manual_seed(0)
    for H, G in [(6, 2), (4, 1), (4, 4)]:
        q = torch.randn(2, H, 5, 8, generator=generator)  # (B, H, L, d)
        k = torch.randn(2, G, 5, 8, generator=generator)  # (B, G, T, d)
        v = torch.randn(2, G, 5, 8, generator=generator)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)  # (B, 1, L, T)
        case = f"{H} query heads, {G} key/value heads"
        for mask in (None, causal):
            kk, vv = repeat_kv(k, H // G), repeat_kv(v, H // G)
            expected, _ = eager_attention(q, kk, vv, mask=mask)
            got = grouped_attention(q, k, v, mask)
            assert isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(expected.shape), \
                f"{case}: output shape {getattr(got, 'shape', type(got))}, expected (B, H, L, d) = " \
                f"{tuple(expected.shape)}"
            if torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
                continue
            if _close(got, _unscaled(q, kk, vv, mask)):
                raise AssertionError(f"{case}: the scale 1 / sqrt(head_dim) is missing: multiply the scores by "
                                     "d ** -0.5 before the softmax")
            if G < H and _close(got, _strided(q, k, v, mask)):
                raise AssertionError(f"{case}: query head h used key/value head h % {G}; it should use h // {H // G} "
                                     f"(heads 0..{H // G - 1} share head 0): split H as (G, n_rep), in that order")
            if mask is not None:  # the unmasked case passed: the mask is what is wrong
                ignored = " (your result is the unmasked one: the mask was ignored)" if _close(
                    got, eager_attention(q, kk, vv)[0]) else ""
                raise AssertionError(f"{case}: right without a mask, wrong with the causal one{ignored}: scores where "
                                     "the mask is False must be -inf before the softmax (masked_fill(~mask, "
                                     "float('-inf'))), and the mask (B, 1, L, T) needs a dimension for n_rep: "
                                     "(B, 1, 1, L, T)")
            head_ok = [torch.allclose(got[:, h], expected[:, h], atol=1e-5, rtol=1e-5) for h in range(H)]
            raise AssertionError(f"{case}, no mask: heads right: {head_ok}. Query head h uses key/value head "
                                 f"h // {H // G}; scores q . k scaled by 1 / sqrt(d), softmax over the keys, then "
                                 "the weighted sum of the values")
    return "equal to repeat_kv then attention (to 1e-5) for 6 heads in 2 groups, multi-query and multi-head"


@exercise("5.3")
def check_pool_kv_heads(pool_kv_heads) -> str:
    mha = GemmaConfig.tiny(num_attention_heads=4, num_key_value_heads=4)  # multi-head: 4 key/value heads of 16
    gqa = dataclasses.replace(mha, num_key_value_heads=2)  # the same model, 2 key/value heads
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * 16, mha.hidden_size, generator=generator)  # a k_proj weight (H * d, D)
    pooled = pool_kv_heads(weight, 2, 16)
    assert isinstance(pooled, torch.Tensor) and tuple(pooled.shape) == (2 * 16, mha.hidden_size), \
        f"4 heads of 16 pooled into 2: expected shape (32, {mha.hidden_size}), got {getattr(pooled, 'shape', None)}"
    by_head = weight.view(4, 16, -1)  # (heads, d, D)
    first = pooled.view(2, 16, -1)[0]
    if torch.allclose(first, (by_head[0] + by_head[2]) / 2, atol=1e-6):
        raise AssertionError("key/value head 0 is the mean of heads 0 and 2: a group is made of neighbouring heads "
                             "(0 and 1, then 2 and 3), the ones repeat_kv gives the same key/value head")
    expected = by_head.view(2, 2, 16, -1).mean(dim=1).reshape(32, -1)
    assert torch.allclose(pooled, expected, atol=1e-6, rtol=1e-6), \
        "each new head should be the mean of its group's heads (rows h*d ... (h+1)*d - 1 of the weight are head h)"
    # heads that are equal within each group: pooling loses nothing, and the GQA layer equals the MHA one
    with torch.random.fork_rng():  # new layers draw their weights: leave the learner's random state alone
        attn, small = GemmaAttention(mha), GemmaAttention(gqa)
    with torch.no_grad():
        for proj in (attn.k_proj, attn.v_proj):
            two = torch.randn(2, 1, 16, mha.hidden_size, generator=generator)  # (G, 1, d, D)
            proj.weight.copy_(two.expand(2, 2, 16, mha.hidden_size).reshape(64, mha.hidden_size))
        small.q_proj.weight.copy_(attn.q_proj.weight)
        small.o_proj.weight.copy_(attn.o_proj.weight)
        small.k_proj.weight.copy_(pool_kv_heads(attn.k_proj.weight, 2, 16))
        small.v_proj.weight.copy_(pool_kv_heads(attn.v_proj.weight, 2, 16))
        x = torch.randn(1, 6, mha.hidden_size, generator=generator)
        cos, sin = GemmaRotaryEmbedding(16)(x, torch.arange(6)[None])
        assert torch.allclose(small(x, cos, sin)[0], attn(x, cos, sin)[0], atol=1e-5, rtol=1e-5), \
            "with equal heads in each group, the pooled grouped-query layer should equal the multi-head one"
    return "each key/value head is the mean of its group, and equal heads pool into the same attention"

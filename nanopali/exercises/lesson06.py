"""Checks for lesson 06's exercises (notebooks/06_gemma.ipynb). Hand-written; solutions in
notebooks/solutions/06_gemma.ipynb."""

import torch

from nanopali.decoder import GemmaConfig
from nanopali.gemma import GemmaForCausalLM

from . import exercise

__all__ = ["check_repetition_penalty", "check_min_p_filter", "check_generate_with_penalty"]


@exercise("6.1")
def check_repetition_penalty(apply_repetition_penalty) -> str:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    previous = torch.tensor([[0, 1, 1],  # row 0 saw token 0 (positive) and token 1 (negative) twice
                             [3, 4, 5]])
    original = logits.clone()
    got = apply_repetition_penalty(logits, previous, 2.0)
    assert torch.equal(logits, original), "the input logits were changed: return new logits (scatter, not scatter_)"
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 6), \
        f"the result should be a tensor of shape (2, 6), like the logits, got {getattr(got, 'shape', type(got))}"
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0, -2.0, 1.0],
                             [2.0, -1.0, 0.5, 1.5, -4.0, 0.5]])
    if got[0, 1].item() == -4.0:
        raise AssertionError("token 1 appears twice in row 0 and was penalised twice: a seen token is penalised once")
    if got[0, 1].item() == -0.5:
        raise AssertionError("a negative logit (-1.0) went up to -0.5: multiply negative scores by the penalty, "
                             "so that they move down too")
    shown = [[round(v, 3) for v in row] for row in got.tolist()]
    assert torch.allclose(got, expected), (f"row 0 gave {shown[0]}, expected "
                                           f"{expected[0].tolist()}; row 1 gave {shown[1]}, "
                                           f"expected {expected[1].tolist()}")
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.0), logits), "a penalty of 1 should change nothing"
    generator = torch.Generator().manual_seed(0)  # its own seed: the learner's random state is left alone
    big = 3 * torch.randn(4, 100, generator=generator)
    seen = torch.randint(0, 100, (4, 12), generator=generator)
    got = apply_repetition_penalty(big, seen, 1.3)
    expected = big.clone()
    for row in range(4):
        for token in set(seen[row].tolist()):
            score = big[row, token]
            expected[row, token] = score / 1.3 if score > 0 else score * 1.3
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6), "wrong on random logits (4 rows, 12 seen tokens each)"
    return "seen tokens lowered once each (positive / r, negative * r), the others untouched, input unchanged"


@exercise("6.2")
def check_min_p_filter(min_p_filter) -> str:
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03],  # a fairly confident row
                          [0.3, 0.26, 0.22, 0.14, 0.08]])  # an unsure one
    logits = probs.log()
    original = logits.clone()
    cases = [(0.4, [{0, 1}, {0, 1, 2, 3}]), (0.1, [{0, 1, 2, 3}, {0, 1, 2, 3, 4}]), (0.9, [{0}, {0}])]
    for min_p, kept in cases:
        got = min_p_filter(logits, min_p)
        assert torch.equal(logits, original), \
            "the input logits were changed: return new logits (masked_fill, not masked_fill_)"
        assert isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 5), \
            f"the result should have the logits' shape (2, 5), got {getattr(got, 'shape', type(got))}"
        if not (got == float("-inf")).any():
            raise AssertionError("no token was set to -inf: dropped tokens must be -inf, not 0 (and return logits, "
                                 "not probabilities)")
        for row in range(2):
            survived = {i for i in range(5) if got[row, i] > float("-inf")}
            shown = [round(p, 3) for p in probs[row].tolist()]
            assert survived == kept[row], (f"min_p {min_p}, probabilities {shown}: kept tokens {sorted(survived)}, "
                                           f"expected {sorted(kept[row])} (the threshold is min_p x the best "
                                           f"token's probability, {min_p * probs[row, 0].item():.3f})")
            assert torch.equal(got[row, sorted(kept[row])], logits[row, sorted(kept[row])]), \
                "the tokens that survive must keep their logits unchanged (return logits, not probabilities)"
    shifted = min_p_filter(logits + 7.0, 0.4)
    assert torch.equal(shifted > float("-inf"), min_p_filter(logits, 0.4) > float("-inf")), \
        "adding 7 to every logit changed which tokens survive: compare probabilities, not raw logits"
    return "keeps the tokens at least min_p times as likely as the best, on a confident and an unsure row"


def _penalised(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = logits.gather(-1, previous)
    return logits.scatter(-1, previous, torch.where(seen > 0, seen / penalty, seen * penalty))


def _length(args, kwargs) -> int:
    "How many new tokens a call model(input_ids, ...) or model(inputs_embeds=...) gets."
    ids = args[0] if args else kwargs.get("input_ids")
    embeds = args[3] if len(args) > 3 else kwargs.get("inputs_embeds")
    return (ids if ids is not None else embeds).shape[1]


def _tiny_model():
    "A tiny Gemma whose plain greedy answer repeats the prompt's last token; the global random state is left alone."
    generator = torch.Generator().manual_seed(6)
    with torch.random.fork_rng():
        model = GemmaForCausalLM(GemmaConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


@exercise("6.3")
def check_generate_with_penalty(generate_with_penalty) -> str:
    model = _tiny_model()
    prompt = torch.tensor([[2, 300, 301, 302, 303]])
    sequence = prompt
    with torch.no_grad():  # the answer, the slow way: the whole sequence through the model at every step
        for _ in range(10):
            logits = _penalised(model(sequence)[:, -1], sequence, 1.5)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    expected = sequence[:, prompt.shape[1]:]
    new_tokens = []  # how many new tokens each forward pass of the learner's loop gets
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: new_tokens.append(_length(args, kwargs)),
                                           with_kwargs=True)
    def one_at_a_time() -> bool:  # the prompt once, then one token per pass
        return bool(new_tokens) and new_tokens[0] == prompt.shape[1] and all(n == 1 for n in new_tokens[1:])

    message = ("your loop fed the model {} tokens per pass: the prompt once, then only the new token, one at a time "
               "against the KVCache (the cache already holds every earlier token's keys and values)")
    try:
        got = generate_with_penalty(model, prompt, 10, 1.5)
    except Exception:
        if new_tokens and not one_at_a_time():  # e.g. a full cache, after feeding it the whole sequence again
            raise AssertionError(message.format(new_tokens)) from None
        raise
    finally:
        hook.remove()
    assert one_at_a_time(), message.format(new_tokens)
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (1, 10), \
        f"10 new tokens for one prompt: expected shape (1, 10), got {getattr(got, 'shape', type(got))}"
    assert got.tolist() == expected.tolist(), (f"got {got[0].tolist()}, recomputing the whole sequence gives "
                                               f"{expected[0].tolist()}: penalise every token already in the sequence "
                                               "(prompt and new tokens) before each argmax")
    return "greedy with a repetition penalty of 1.5, cached one token at a time, equals recomputing every step"

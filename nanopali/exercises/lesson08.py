"""Checks for lesson 08's exercises (notebooks/08_training.ipynb). Hand-written; solutions in
notebooks/solutions/08_training.ipynb."""

import math

import torch
import torch.nn.functional as F

from nanopali.train import loc_tokens, score, suffix_loss

from . import exercise


def _answer_batch():
    """Three right-padded sequences as the processor lays them out: 2 image tokens, <bos> (2), the prompt, the
    newline (9), then the answer and <eos> (1) with token type 1, then padding (0) with token type 0."""
    rows = [([5, 5, 2, 7, 8, 9], [3, 1]),  # a one-word answer
            ([5, 5, 2, 7, 9], [10, 11, 12, 3, 1]),  # a longer answer
            ([5, 5, 2, 8, 8, 7, 9], [4, 1])]
    length = max(len(p) + len(s) for p, s in rows) + 1  # one padding position at least
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    token_type_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (prefix, suffix) in enumerate(rows):
        n = len(prefix) + len(suffix)
        input_ids[i, :n] = torch.tensor(prefix + suffix)
        token_type_ids[i, len(prefix):n] = 1
        attention_mask[i, :n] = 1
    return input_ids, token_type_ids, attention_mask


@exercise("8.1")
def check_answer_loss(answer_loss) -> str:
    input_ids, token_type_ids, attention_mask = _answer_batch()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*input_ids.shape, 13, generator=generator) * 3
    labels = input_ids.masked_fill(token_type_ids == 0, -100)
    expected = suffix_loss(logits, labels)
    got = answer_loss(logits.clone(), input_ids.clone(), token_type_ids.clone())
    got = torch.as_tensor(got, dtype=torch.float32)
    assert got.numel() == 1, f"the loss should be one number, got a tensor of shape {tuple(got.shape)}"

    def close(value):
        return math.isclose(got.item(), float(value), rel_tol=1e-5, abs_tol=1e-5)

    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    counted = labels[:, 1:] != -100
    assert not close(per_token.sum() / counted.sum()), \
        "that is the mean over all answer tokens of the batch: average each sequence's answer first, then the sequences"
    unshifted = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    assert not close(((unshifted * (labels != -100)).sum(1) / (labels != -100).sum(1)).mean()), \
        "the output at position t predicts the token at t + 1: compare logits[:, :-1] with labels[:, 1:]"
    with_prompt = input_ids.masked_fill(attention_mask == 0, -100)
    assert not close(suffix_loss(logits, with_prompt)), \
        "the prompt and the image tokens are counted too: only tokens of type 1 (the answer) are labels"
    assert close(expected), f"got {got.item():.5f}, expected {expected.item():.5f}"
    moved = logits.clone()
    moved[token_type_ids == 0] += 100 * torch.randn(int((token_type_ids == 0).sum()), 13, generator=generator)
    moved[:, -1] += 100  # the last position predicts nothing
    keep_prompt_outputs = torch.zeros_like(token_type_ids, dtype=torch.bool)
    keep_prompt_outputs[:, :-1] = token_type_ids[:, 1:] == 1  # outputs that predict an answer token stay the same
    moved[keep_prompt_outputs] = logits[keep_prompt_outputs]
    again = torch.as_tensor(answer_loss(moved, input_ids.clone(), token_type_ids.clone()), dtype=torch.float32)
    assert math.isclose(again.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-5), \
        "the loss moved when outputs that predict no answer token changed: they must not count"
    return ("the loss of three right-padded sequences with answers of 2, 5 and 2 tokens, unmoved by "
            "outputs that predict no answer token")


@exercise("8.2")
def check_wsd_factor(wsd_factor) -> str:
    steps, warmup, decay, final = 100, 10, 20, 0.1
    known = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 100: 0.1, 130: 0.1}
    hints = {0: "the first step already uses 1/warmup of the peak ((step + 1) / warmup, as learning_rate_factor): "
                "a step at rate 0 is a wasted step",
             9: "the warm-up ends at step warmup - 1 with the full rate",
             50: "between the warm-up and the last `decay` steps the factor stays at 1",
             80: "the decay starts at step steps - decay, from 1",
             90: "half-way through the decay, a cosine is half-way down: final + (1 - final) * 0.5 * (1 + cos(pi / 2))",
             100: "at `steps` the factor reaches final_fraction",
             130: "after `steps` the factor stays at final_fraction"}
    for step, value in known.items():
        got = float(wsd_factor(step, steps, warmup, decay, final))
        assert math.isclose(got, value, abs_tol=1e-9), \
            f"at step {step} the factor is {got:.4f}, expected {value}: {hints.get(step, 'check the formula')}"
    curve = [float(wsd_factor(s, steps, warmup, decay, final)) for s in range(120)]
    assert all(b <= a + 1e-12 for a, b in zip(curve[warmup:], curve[warmup + 1:])), \
        "after the warm-up the factor should never rise"
    expected = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * 7 / 20))
    assert math.isclose(curve[87], expected, abs_tol=1e-9), \
        f"at step 87 the factor is {curve[87]:.4f}, expected {expected:.4f}: the decay is a half cosine"
    return "warm-up, hold, cosine decay at 9 known steps (100 steps, warm-up 10, decay 20), never rising after warm-up"


@exercise("8.3")
def check_detection_score(box_iou, detection_score) -> str:
    cases = [((0, 0, 10, 10), (0, 0, 10, 10), 1.0, "identical boxes"),
             ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175, "boxes overlapping on a corner"),
             ((0, 0, 10, 20), (2, 4, 6, 8), 16 / 200, "a box inside another"),
             ((0, 0, 10, 10), (0, 10, 10, 20), 0.0, "boxes that only touch"),
             ((0, 0, 10, 10), (20, 0, 30, 10), 0.0, "boxes apart vertically"),
             ((0, 0, 10, 10), (20, 20, 30, 30), 0.0, "boxes apart in both directions")]
    for a, b, value, what in cases:
        for x, y in ((a, b), (b, a)):
            got = float(box_iou(x, y))
            hint = (": two negative overlaps multiply to a positive area; clamp each at 0"
                    if what.endswith("both directions") else "")
            assert math.isclose(got, value, abs_tol=1e-9), \
                f"box_iou{(x, y)} = {got:.4f}, expected {value:.4f} ({what}){hint}"
    truth = {"circle": (20, 30, 60, 70), "star": (70, 10, 100, 40)}
    suffix = f"{loc_tokens(truth['circle'], 112)} circle ; {loc_tokens(truth['star'], 112)} star"
    circle, star = loc_tokens((22, 31, 62, 69), 112), loc_tokens((71, 12, 99, 41), 112)  # IoU 0.86 and 0.87
    far_star = loc_tokens((70, 30, 100, 60), 112)  # IoU 0.2 with the true star
    answers = {"both boxes right": f"{circle} circle ; {star} star",
               "the star's box too far off": f"{circle} circle ; {far_star} star",
               "the boxes' names swapped": f"{circle} star ; {star} circle",
               "the star missing": f"{circle} circle",
               "an answer with no boxes": "circle ; star"}
    for what, answer in answers.items():
        expected = score("detect", answer, suffix, 112)
        got = tuple(int(v) for v in detection_score(answer, suffix, 112))
        assert got == expected, f"{what}: (found, asked) = {got}, expected {expected}"
    return "box_iou on 6 pairs of boxes (both orders), detection_score on 5 answers to 'detect circle ; star'"

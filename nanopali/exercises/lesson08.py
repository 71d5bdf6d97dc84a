"""Checks for lesson 08's exercises (notebooks/08_training.ipynb). Hand-written; solutions in
notebooks/solutions/08_training.ipynb."""

import math

import torch
import torch.nn.functional as F

from nanopali.train import loc_tokens, suffix_loss

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
def check_match_detections(match_detections) -> str:
    def boxes(*objects):  # (name, box in pixels) -> the answer's text
        return " ; ".join(f"{loc_tokens(box, 112)} {name}" for name, box in objects)

    truth = boxes(("circle", (20, 30, 60, 70)), ("star", (70, 10, 100, 40)))
    circle, star = ("circle", (22, 31, 62, 69)), ("star", (71, 12, 99, 41))  # IoU 0.86 and 0.84 with the truth
    circle_again, square = ("circle", (19, 29, 59, 71)), ("square", (5, 80, 25, 105))  # IoU 0.91; not there
    two_circles = boxes(("circle", (20, 20, 60, 60)), ("circle", (30, 30, 70, 70)))  # overlapping, IoU 0.39
    between = ("circle", (25, 25, 65, 65))  # IoU 0.62 with each of the two circles
    cases = [("both boxes right", boxes(circle, star), truth, (1, 1), ""),
             ("the circle boxed twice", boxes(circle, circle_again, star), truth, (2 / 3, 1),
              ": a true object is found by one box at most; the second box on it is a false positive"),
             ("an extra box of a square that is not there", boxes(circle, star, square), truth, (2 / 3, 1),
              ": precision is the share of the answer's boxes that are matched"),
             ("the star missing", boxes(circle), truth, (1, 1 / 2),
              ": recall is the share of the true objects that are matched"),
             ("the boxes' names swapped", boxes(("star", circle[1]), ("circle", star[1])), truth, (0, 0),
              ": a box and an object match only when they have the same name"),
             ("an answer with no boxes", "circle ; star", truth, (0, 0),
              ": with no boxes, precision is 0 (and there is nothing to divide by)"),
             ("one box between two overlapping circles", boxes(between), two_circles, (1, 1 / 2),
              ": once a box is matched to one circle it is taken, and cannot count for the other")]
    for what, answer, suffix, expected, hint in cases:
        result = match_detections(answer, suffix, 112)
        assert len(result) == 2, f"return (precision, recall), got {result!r}"
        got = tuple(float(v) for v in result)
        assert all(math.isclose(g, e, abs_tol=1e-9) for g, e in zip(got, expected)), \
            (f"{what}: (precision, recall) = ({got[0]:.3f}, {got[1]:.3f}), expected ({expected[0]:.3f}, "
             f"{expected[1]:.3f}){hint}")
    return ("precision and recall of 7 answers, among them a circle boxed twice, an extra box and one box between "
            "two circles")

"""Checks for lesson 03's exercises (notebooks/03_bridge.ipynb). Hand-written; solutions in
notebooks/solutions/03_bridge.ipynb."""

from __future__ import annotations

import functools

import torch
from PIL import Image

from nanopali.bridge import PaliGemmaProcessor, build_tokenizer, merge_image_features, prefix_lm_mask

from . import exercise

__all__ = ["check_prefix_lm_mask", "check_merge_image_features", "check_detection_example"]

TEXTS = ["caption en", "answer en what color is the circle?", "detect circle ; square", "a red circle",
         "the cat is on the sofa", "yes", "no"] * 10
PROMPTS = ["caption en", "answer en what color is the big circle?", "detect circle"]
SUFFIXES = ["the cat is on the sofa", "red", "no"]


@functools.lru_cache(maxsize=1)
def _processor() -> PaliGemmaProcessor:
    "A small processor in PaliGemma's layout: 3 image tokens, 28-pixel images (the same every time)."
    return PaliGemmaProcessor(build_tokenizer(TEXTS, vocab_size=400), num_image_tokens=3, image_size=(28, 28))


def _batch(side: str, suffixes: list[str] | None = SUFFIXES) -> dict:
    "Three examples of different lengths, padded on `side`."
    images = [Image.new("RGB", (28, 28), color) for color in ["red", "green", "blue"]]
    return _processor()(images, PROMPTS, suffixes=suffixes, padding_side=side)


def _mask_problem(got: torch.Tensor, want: torch.Tensor, types: torch.Tensor, attention: torch.Tensor) -> str:
    "Say in words what is wrong at the first place where the two masks differ."
    wrong = got != want
    padding_query, padding_key = (attention == 0)[:, :, None], (attention == 0)[:, None, :]
    if ((wrong & ~padding_query & ~padding_key).sum() == 0 and (wrong & padding_query).any()
            and (got & padding_query & ~padding_key).sum() == 0):  # padding rows blanked instead of columns
        return ("the padding rows (queries) see no real token: padding is removed on the key axis (columns), not "
                "the query axis (rows): no query may see a padding key, and a padding query still sees the real "
                "tokens the rule allows (its output is never used)")
    b, i, j = (int(v) for v in wrong.nonzero()[0])
    where = f"row {b}, query {i}, key {j}"
    if i == j:
        return (f"{where}: a token must always see itself, padding included (a padding query that sees nothing "
                "gives a softmax of 0 / 0 = NaN)")
    if attention[b, j] == 0:
        return f"{where}: key {j} is padding (attention_mask 0), and no query may attend to padding"
    if j > i and types[b, j] == 0:
        return f"{where}: key {j} is in the prefix (type 0), which every query sees, even from earlier positions"
    if j > i:
        return f"{where}: key {j} is a later suffix token (type 1): the suffix is causal, it cannot be seen early"
    return f"{where}: key {j} is real and at or before the query ({j} <= {i}), so the query may see it"


@exercise("3.1")
def check_prefix_lm_mask(my_prefix_lm_mask) -> str:
    "Compare with the lesson's prefix_lm_mask on a left- and a right-padded batch of three training examples."
    for side in ["left", "right"]:
        batch = _batch(side)
        types, attention = batch["token_type_ids"], batch["attention_mask"]
        want = prefix_lm_mask(types, attention)
        got = my_prefix_lm_mask(types.clone(), attention.clone())
        assert isinstance(got, torch.Tensor), f"expected a tensor, got {type(got).__name__}"
        assert tuple(got.shape) == tuple(want.shape), \
            f"shape {tuple(got.shape)}, expected (B, L, L) = {tuple(want.shape)}"
        assert got.dtype == torch.bool, f"dtype {got.dtype}, expected torch.bool (True: may attend)"
        if not torch.equal(got, want):
            raise AssertionError(f"{side}-padded batch, {_mask_problem(got, want, types, attention)}")
    return "equal to prefix_lm_mask on a left- and a right-padded batch of three examples with answers"


@exercise("3.2")
def check_merge_image_features(my_merge) -> str:
    "Compare with the lesson's merge_image_features on a left-padded batch of three rows."
    processor, batch = _processor(), _batch("left", suffixes=None)
    input_ids, image_id = batch["input_ids"], processor.image_token_id
    torch.manual_seed(0)
    text_embeds = torch.randn(*input_ids.shape, 8)  # (3, L, 8)
    image_features = torch.randn(3, processor.num_image_tokens, 8)  # (3, 3, 8)
    before = text_embeds.clone()
    got = my_merge(text_embeds, image_features, input_ids, image_id)
    assert torch.equal(text_embeds, before), \
        "text_embeds changed in place: work on a copy (text_embeds.clone()), the caller may still need it"
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(text_embeds.shape), \
        f"expected a tensor of shape {tuple(text_embeds.shape)} (the text embeddings' shape)"
    want = merge_image_features(text_embeds, image_features, input_ids, image_id)
    for b in range(3):
        slots = input_ids[b] == image_id
        assert torch.equal(got[b][~slots], text_embeds[b][~slots]), \
            f"row {b}: a position that is not an <image> slot changed; only the slots take image features"
        if not torch.equal(got[b][slots], image_features[b]):
            first = int(slots.nonzero()[0])
            others = [c for c in range(3) if c != b and torch.equal(got[b][slots], image_features[c])]
            assert not others, f"row {b}'s slots hold image {others[0]}'s features: each row takes its own image's"
            assert torch.equal(got[b][slots].sort(0).values, image_features[b].sort(0).values), \
                (f"row {b}'s slots (positions {first} to {first + len(image_features[b]) - 1}, after the left "
                 "padding) do not hold that image's features: find the slots with input_ids == image_token_id")
            raise AssertionError(f"row {b}'s slots hold its image's features, but not in order: feature k goes "
                                 "into the k-th <image> slot")
    assert torch.equal(got, want)
    return "each row's <image> slots hold its own image's features, in order, on a left-padded batch"


def _locs(box, image_size: int) -> str:
    return "".join(f"<loc{round(v / image_size * 1023):04d}>" for v in box)


@exercise("3.3")
def check_detection_example(detection_example) -> str:
    "Boxes and names to one training example; compared with the rule of PaliGemma's detection answers."
    processor = _processor()
    boxes = [(10.0, 20.0, 200.0, 150.5), (0.0, 0.0, 224.0, 224.0)]
    names = ["cat", "circle"]
    suffix = " ; ".join(f"{_locs(box, 224)} {name}" for box, name in zip(boxes, names))
    want_ids, types = processor.encode("detect cat ; circle", suffix)
    want_labels = [i if t == 1 else -100 for i, t in zip(want_ids, types)]
    got = detection_example(processor, "detect cat ; circle", boxes, names, 224)
    assert isinstance(got, tuple) and len(got) == 2, "return a pair (input_ids, labels), two lists of ints"
    ids, labels = (v.tolist() if isinstance(v, torch.Tensor) else list(v) for v in got)
    if ids != want_ids:
        text = processor.decode(ids, skip_special_tokens=False)
        expected = processor.decode(want_ids, skip_special_tokens=False)
        assert "<loc1023>" in text or "<loc1024>" not in text, \
            "a coordinate equal to the image size must give <loc1023>: scale by 1023, not 1024"
        swapped = _locs((boxes[0][1], boxes[0][0], boxes[0][3], boxes[0][2]), 224)
        assert swapped not in text, "y comes first: each box is <locYMIN><locXMIN><locYMAX><locXMAX>"
        raise AssertionError(f"the answer reads {text.split(chr(10))[-1]!r}; expected {expected.split(chr(10))[-1]!r}")
    assert len(labels) == len(want_ids), f"{len(labels)} labels for {len(want_ids)} ids: one label per id"
    assert labels[0] == -100, "the prefix (image slots, <bos>, the prompt, \\n) gets label -100: no loss there"
    assert labels == want_labels, "labels are the suffix's ids (answer and <eos>) and -100 everywhere else"
    return (f"'{suffix}' and its labels, with -100 on the {types.count(0)} prefix tokens")

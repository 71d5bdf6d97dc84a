"""Lesson 03 against the reference: transformers' PaliGemmaProcessor and PaliGemmaMultiModalProjector.

The tokenizer is the lesson's own (build_tokenizer), saved as a model folder that
transformers reads the way it reads a real PaliGemma folder."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from nanopali.bridge import (
    IMAGE_TOKEN,
    LOC_TOKENS,
    PaliGemmaMultiModalProjector,
    PaliGemmaProcessor,
    build_tokenizer,
    merge_image_features,
    prefix_lm_mask,
)

from conftest import IMAGES

transformers = pytest.importorskip("transformers")
from transformers.models.paligemma import modeling_paligemma  # noqa: E402

TEXTS = ["caption en", "describe en", "answer en what color is the circle?", "detect circle ; square",
         "a large red circle and a small blue square", "the cow is standing on the beach",
         "where is the cat sitting?", "yes", "no", "red"] * 10
NUM_IMAGE_TOKENS, SIZE = 16, 56
PROMPTS = ["caption en", "answer en what color is the big circle on the left?"]
SUFFIXES = ["a cat on a sofa", "red"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    "A model folder as a PaliGemma download lays it out: tokenizer, its config, the image settings."
    folder = tmp_path_factory.mktemp("tiny_paligemma")
    build_tokenizer(TEXTS, vocab_size=400).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "padding_side": "left"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "image_processor_type": "SiglipImageProcessor", "image_seq_length": NUM_IMAGE_TOKENS,
        "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": SIZE, "width": SIZE}}))
    return folder


def reference_processor(folder, padding_side="left"):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = padding_side
    images = SiglipImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                     size={"height": SIZE, "width": SIZE}, resample=3)
    images.image_seq_length = NUM_IMAGE_TOKENS
    return transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)


def photos(n):
    return [Image.open(IMAGES / name) for name in ["chelsea.png", "coffee.jpg", "rocket.jpg"][:n]]


def assert_same_batch(ours, ref, with_labels):
    keys = ["input_ids", "attention_mask", "token_type_ids"] + (["labels"] if with_labels else [])
    for key in keys:
        assert ours[key].tolist() == ref[key].tolist(), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    assert ("labels" in ours) == with_labels


def test_prefix_only_equals_reference(folder):
    ours = PaliGemmaProcessor.from_folder(folder)(photos(1), PROMPTS[:1])
    ref = reference_processor(folder)(images=photos(1), text=PROMPTS[:1], return_tensors="pt")
    assert_same_batch(ours, ref, with_labels=False)


def test_prefix_and_suffix_equal_reference(folder):
    ours = PaliGemmaProcessor.from_folder(folder)(photos(1), PROMPTS[1:], suffixes=SUFFIXES[1:])
    ref = reference_processor(folder)(images=photos(1), text=PROMPTS[1:], suffix=SUFFIXES[1:], return_tensors="pt")
    assert_same_batch(ours, ref, with_labels=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two_equals_reference(folder, side):
    ours = PaliGemmaProcessor.from_folder(folder)(photos(2), PROMPTS, suffixes=SUFFIXES, padding_side=side)
    ref = reference_processor(folder, side)(images=photos(2), text=PROMPTS, suffix=SUFFIXES, padding="longest",
                                            return_tensors="pt")
    assert (ours["attention_mask"] == 0).any(), "the prompts should differ in length"
    assert_same_batch(ours, ref, with_labels=True)


def test_prompts_with_location_tokens_equal_reference(folder):
    prompt, suffix = "detect circle ; square", "<loc0012><loc0100><loc0512><loc1023> circle ; <loc0000>" * 2
    ours = PaliGemmaProcessor.from_folder(folder)(photos(1), [prompt], suffixes=[suffix])
    ref = reference_processor(folder)(images=photos(1), text=[prompt], suffix=[suffix], return_tensors="pt")
    assert_same_batch(ours, ref, with_labels=True)


def test_folder_saved_by_transformers_reads_the_same(folder, tmp_path):
    "Newer folders keep the image settings in processor_config.json, nested under image_processor."
    reference_processor(folder).save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file()
    (tmp_path / "preprocessor_config.json").unlink(missing_ok=True)
    ours = PaliGemmaProcessor.from_folder(tmp_path)
    assert ours.num_image_tokens == NUM_IMAGE_TOKENS and ours.image_size == (SIZE, SIZE)
    original = PaliGemmaProcessor.from_folder(folder)
    assert ours.encode(PROMPTS[1], SUFFIXES[1]) == original.encode(PROMPTS[1], SUFFIXES[1])


@pytest.mark.parametrize("text", ["naïve café, 東京 🙂 and Ω", "caption en\nthe cat", "<loc0001> circle"])
def test_decoding_round_trips_and_equals_reference(folder, text):
    ours = PaliGemmaProcessor.from_folder(folder)
    ids = ours.tokenizer.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text  # byte tokens are not dropped as special tokens
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    assert ref.encode(text, add_special_tokens=False) == ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_special_tokens_are_skipped_when_decoding(folder):
    processor = PaliGemmaProcessor.from_folder(folder)
    ids, _ = processor.encode("caption en", "the cat")
    assert processor.decode(ids) == "caption en\nthe cat"
    assert processor.decode(ids, skip_special_tokens=False).startswith(IMAGE_TOKEN * NUM_IMAGE_TOKENS + "<bos>")


def test_tokenizer_layout_is_paligemmas():
    tokenizer = build_tokenizer(TEXTS, vocab_size=400)
    ids = {t: tokenizer.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "<0x00>", "<0xFF>"]}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\n": 4, "<0x00>": 5, "<0xFF>": 260}
    locs = [tokenizer.token_to_id(t) for t in LOC_TOKENS]
    assert locs == list(range(locs[0], locs[0] + 1024))
    assert tokenizer.token_to_id("<seg000>") == locs[-1] + 1
    assert tokenizer.token_to_id(IMAGE_TOKEN) == locs[-1] + 129 == tokenizer.get_vocab_size() - 1


def test_build_tokenizer_is_deterministic():
    a, b = build_tokenizer(TEXTS, vocab_size=400), build_tokenizer(TEXTS, vocab_size=400)
    assert a.to_str() == b.to_str()


def test_projector_equals_reference():
    torch.manual_seed(0)
    config = SimpleNamespace(vision_config=SimpleNamespace(hidden_size=32, projection_dim=48))
    ref = modeling_paligemma.PaliGemmaMultiModalProjector(config).eval()
    ours = PaliGemmaMultiModalProjector(32, 48).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_real_projector_shape():
    with torch.device("meta"):
        projector = PaliGemmaMultiModalProjector(1152, 2048)
    assert sum(p.numel() for p in projector.parameters()) == 2_361_344


def brute_force_mask(types, attention):
    "The rule of REFERENCE.md, one pair at a time."
    B, L = types.shape
    out = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                out[b, i, j] = ((j <= i or types[b, j] == 0) and attention[b, j] == 1) or i == j
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_lm_mask_follows_the_rule(folder, side):
    batch = PaliGemmaProcessor.from_folder(folder)(photos(2), PROMPTS, suffixes=SUFFIXES, padding_side=side)
    mask = prefix_lm_mask(batch["token_type_ids"], batch["attention_mask"])
    assert torch.equal(mask, brute_force_mask(batch["token_type_ids"], batch["attention_mask"]))
    assert mask.any(-1).all(), "every row attends to something"
    for q in (1, 3):
        assert torch.equal(prefix_lm_mask(batch["token_type_ids"], batch["attention_mask"], num_queries=q),
                           mask[:, -q:])


def test_a_causal_left_padded_row_never_has_an_empty_mask_row():
    types = torch.ones(1, 5, dtype=torch.long)  # all suffix: plain causal attention
    attention = torch.tensor([[0, 0, 1, 1, 1]])
    mask = prefix_lm_mask(types, attention)[0]
    assert mask[0].tolist() == [True, False, False, False, False]  # padding sees only itself
    assert mask[4].tolist() == [False, False, True, True, True]


def test_prefix_lm_mask_is_bidirectional_on_the_prefix_and_causal_on_the_suffix():
    types = torch.tensor([[0, 0, 0, 1, 1]])
    mask = prefix_lm_mask(types, torch.ones_like(types))[0]
    assert mask[0, 2] and mask[2, 0]  # prefix: both ways
    assert mask[3, 0] and not mask[3, 4] and mask[4, 3]  # suffix: causal
    assert not mask[1, 3]  # the prefix never sees the suffix


def test_merge_puts_each_images_features_in_its_own_slots(folder):
    processor = PaliGemmaProcessor.from_folder(folder)
    batch = processor(photos(2), PROMPTS, padding_side="left")
    text = torch.randn(*batch["input_ids"].shape, 8)
    features = torch.randn(2, NUM_IMAGE_TOKENS, 8)
    merged = merge_image_features(text, features, batch["input_ids"], processor.image_token_id)
    for b in range(2):
        slots = batch["input_ids"][b] == processor.image_token_id
        assert torch.equal(merged[b][slots], features[b])
        assert torch.equal(merged[b][~slots], text[b][~slots])
    assert not torch.equal(merged, text)


def test_merge_refuses_mismatched_counts(folder):
    processor = PaliGemmaProcessor.from_folder(folder)
    batch = processor(photos(2), PROMPTS)
    text = torch.zeros(*batch["input_ids"].shape, 8)
    with pytest.raises(ValueError, match=r"\[16, 16\] <image> tokens .* but 2 images of 12 features"):
        merge_image_features(text, torch.zeros(2, 12, 8), batch["input_ids"], processor.image_token_id)
    with pytest.raises(ValueError, match="do not match"):
        merge_image_features(text, torch.zeros(3, 16, 8), batch["input_ids"], processor.image_token_id)


@pytest.mark.parametrize("prompt, suffix, token", [("caption en <image>", None, "<image>"),
                                                   ("caption en", "a <image> cat", "<image>"),
                                                   ("caption en", "a cat<eos> and more", "<eos>"),
                                                   ("<bos>caption en", None, "<bos>"),
                                                   ("caption en", "<pad>", "<pad>")])
def test_special_tokens_typed_in_text_are_refused(folder, prompt, suffix, token):
    processor = PaliGemmaProcessor.from_folder(folder)
    with pytest.raises(ValueError, match=f"contains '{token}', a special token the processor places itself"):
        processor(photos(1), [prompt], suffixes=None if suffix is None else [suffix])


def test_image_and_prompt_counts_must_match(folder):
    processor = PaliGemmaProcessor.from_folder(folder)
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        processor(photos(1), PROMPTS)
    with pytest.raises(ValueError, match="got 1 suffixes for 2 prompts"):
        processor(photos(2), PROMPTS, suffixes=["red"])


@pytest.mark.parametrize("suffixes, row, got", [(["a cat", None], 1, "None"), ([None, "red"], 0, "None"),
                                                 (["a cat", 3], 1, "a int")])
def test_a_suffix_that_is_not_a_string_is_refused_naming_its_row(folder, suffixes, row, got):
    "A None suffix would give its row no labels at all: the batch would silently train on nothing there."
    processor = PaliGemmaProcessor.from_folder(folder)
    with pytest.raises(TypeError, match=rf"suffixes\[{row}\] is {got}, not a string: give every example its answer"):
        processor(photos(2), PROMPTS, suffixes=suffixes)


def test_a_prompt_that_is_not_a_string_is_refused_naming_its_row(folder):
    processor = PaliGemmaProcessor.from_folder(folder)
    with pytest.raises(TypeError, match=r"prompts\[1\] is None, not a string: give one prompt per image"):
        processor(photos(2), ["caption en", None])
    with pytest.raises(ValueError, match="no prompts given"):
        processor(photos(1), None)
    with pytest.raises(ValueError, match="got 0 images for 1 prompts"):
        processor(None, "caption en")
    with pytest.raises(TypeError, match="a set has no order"):
        processor(photos(2), PROMPTS, suffixes={"red", "blue"})


def test_the_processor_scales_16_bit_images_and_refuses_empty_ones(folder):
    import numpy as np

    processor = PaliGemmaProcessor.from_folder(folder)
    gray = Image.open(IMAGES / "chelsea.png").convert("L")
    deep = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # the same picture in 16 bits
    assert deep.mode == "I;16"
    assert torch.equal(processor([deep], ["caption en"])["pixel_values"],
                       processor([gray], ["caption en"])["pixel_values"])
    with pytest.raises(ValueError, match=r"the image has no pixels \(0 x 0\)"):
        processor([Image.new("RGB", (0, 0))], ["caption en"])


def test_folder_errors_are_clear(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        PaliGemmaProcessor.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="no image_seq_length"):
        PaliGemmaProcessor.from_folder(tmp_path)


def test_a_tokenizer_without_paligemma_tokens_is_refused():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="not a PaliGemma tokenizer"):
        PaliGemmaProcessor(Tokenizer(models.BPE()), num_image_tokens=4)


# Exercises: each check accepts a right answer and refuses plausible wrong ones.

def _right_mask(types, attention):
    L = types.shape[1]
    position = torch.arange(L)
    causal = position[None, :] <= position[:, None]
    return ((causal | (types == 0)[:, None, :]) & (attention == 1)[:, None, :]) | torch.eye(L, dtype=torch.bool)


def test_exercise_prefix_lm_mask_check(capsys):
    from nanopali.exercises.lesson03 import check_prefix_lm_mask

    def without_diagonal(types, attention):  # padding rows see nothing: NaN in the softmax
        L = types.shape[1]
        causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
        return (causal | (types == 0)[:, None, :]) & (attention == 1)[:, None, :]

    def ignores_padding(types, attention):
        return _right_mask(types, torch.ones_like(attention))

    def plain_causal(types, attention):
        return _right_mask(torch.ones_like(types), attention)

    assert not check_prefix_lm_mask(without_diagonal)
    assert "must always see itself" in capsys.readouterr().out
    assert not check_prefix_lm_mask(ignores_padding)
    assert "padding" in capsys.readouterr().out
    assert not check_prefix_lm_mask(plain_causal)
    assert "in the prefix" in capsys.readouterr().out

    def padding_rows(types, attention):  # masks padding queries (rows) instead of padding keys (columns)
        L = types.shape[1]
        causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
        return ((causal | (types == 0)[:, None, :]) & (attention == 1)[:, :, None]) | torch.eye(L, dtype=torch.bool)

    def rows_and_columns(types, attention):  # right on the columns, but also blanks the padding rows
        return _right_mask(types, attention) & ((attention == 1)[:, :, None] | torch.eye(types.shape[1], dtype=bool))

    for wrong in (padding_rows, rows_and_columns):
        assert not check_prefix_lm_mask(wrong)
        assert "key axis (columns), not the query axis" in capsys.readouterr().out
    assert check_prefix_lm_mask(_right_mask)
    assert "correct" in capsys.readouterr().out


def test_exercise_merge_check(capsys):
    from nanopali.exercises.lesson03 import check_merge_image_features

    def in_place(text_embeds, image_features, input_ids, image_token_id):
        text_embeds[input_ids == image_token_id] = image_features.reshape(-1, image_features.shape[-1])
        return text_embeds

    def slots_at_the_start(text_embeds, image_features, input_ids, image_token_id):  # forgets the left padding
        merged = text_embeds.clone()
        merged[:, : image_features.shape[1]] = image_features
        return merged

    def right(text_embeds, image_features, input_ids, image_token_id):
        merged = text_embeds.clone()
        merged[input_ids == image_token_id] = image_features.reshape(-1, image_features.shape[-1])
        return merged

    assert not check_merge_image_features(in_place)
    assert "in place" in capsys.readouterr().out
    assert not check_merge_image_features(slots_at_the_start)
    assert "not right yet" in capsys.readouterr().out
    assert check_merge_image_features(right)


def _detection(scale, order=(0, 1, 2, 3), prefix_label=-100):
    def detection_example(processor, prompt, boxes, names, image_size):
        objects = []
        for box, name in zip(boxes, names):
            locs = "".join(f"<loc{round(box[k] / image_size * scale):04d}>" for k in order)
            objects.append(f"{locs} {name}")
        ids, types = processor.encode(prompt, " ; ".join(objects))
        return ids, [i if t == 1 else prefix_label for i, t in zip(ids, types)]
    return detection_example


def test_exercise_detection_check(capsys):
    from nanopali.exercises.lesson03 import check_detection_example

    assert not check_detection_example(_detection(1024))
    assert "1023, not 1024" in capsys.readouterr().out
    assert not check_detection_example(_detection(1023, order=(1, 0, 3, 2)))
    assert "y comes first" in capsys.readouterr().out
    assert not check_detection_example(_detection(1023, prefix_label=0))
    assert "-100" in capsys.readouterr().out
    assert check_detection_example(_detection(1023))

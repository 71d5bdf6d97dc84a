"""Lesson 11 against the reference: PaliGemma 2, transformers' PaliGemmaForConditionalGeneration with a Gemma 2 text
model (eager attention, the path that applies the soft-caps).

Tiny random PaliGemma 2s made by transformers, with soft-caps small enough to matter, a query_pre_attn_scalar that is
not head_dim and grouped key/value heads, are saved in the three tensor-name layouts; nanopali.load must give the same
logits (float32, 1e-5) and the same greedy answers, also when the sliding window is shorter than the sequence. Then
save, the published sizes, int8, attention maps, the command line, and the configs that are refused."""

import json

import pytest
import torch
from PIL import Image
from test_paligemma import IMAGE_FILES, LAYOUTS, PROMPTS, TEXTS, write_folder

import nanopali
from nanopali.__main__ import main
from nanopali.bridge import PaliGemmaProcessor, build_tokenizer
from nanopali.gemma import generate_tokens, generation_loop
from nanopali.gemma2 import (
    PALIGEMMA2_3B_224_CONFIG,
    PALIGEMMA2_SIZES,
    Gemma2Config,
    Gemma2ForCausalLM,
)
from nanopali.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration, canonical_name, load, save
from nanopali.patches import SiglipVisionConfig
from nanopali.quantize import Int8Linear, quantize_int8
from nanopali.visualize import generate_with_attention

from conftest import reference_gemma_config

transformers = pytest.importorskip("transformers")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=3.0)
IMAGE_TOKENS = 16  # 56 px images in 14 px patches: a 4 x 4 grid


def reference_model(tokenizer, large_weights=False, sliding_window=4096):
    """A tiny random PaliGemma 2 (transformers' own, eager attention): its initialisation (std 0.02) for logits, large
    weights for generation, so that greedy answers vary with the input: std 0.3, but 0.1 for the embedding table.
    (Gemma 2 normalises each block's output, so the embedding, scaled by sqrt(64), would otherwise outweigh all four
    layers and every answer would repeat the prompt's last token; this way the logits reach about 2, where the
    final cap of 3 bends them.)"""
    vocab = tokenizer.get_vocab_size()
    config = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, patch_size=14, image_size=56, vision_use_head=False),
        text_config=dict(model_type="gemma2", vocab_size=vocab, sliding_window=sliding_window, **TEXT),
        image_token_index=tokenizer.token_to_id("<image>"), projection_dim=64, hidden_size=64, vocab_size=vocab)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    assert model.config.text_config._attn_implementation == "eager"  # sdpa would skip the attention soft-cap
    if large_weights:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "lm_head.weight":
                    p.normal_(0.0, 0.1 if "embed_tokens" in name else 0.3)
        model.tie_weights()
    return model


def reference_answers(reference, processor, images, prompts, max_new_tokens=10):
    inputs = processor(images, prompts)
    out = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=1)
    return [processor.decode(row) for row in out[:, inputs["input_ids"].shape[1]:]]


def images():
    return [Image.open(f) for f in IMAGE_FILES]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def reference(tokenizer):
    return reference_model(tokenizer)


@pytest.fixture(scope="module")
def reference_large(tokenizer):
    return reference_model(tokenizer, large_weights=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer, reference, reference_large):
    "The folders most tests read, written once: realistic and large weights, sliding window 8 (< 16 image tokens)."
    made = {}
    for name, model, layout in [("realistic", reference, "transformers 5"),
                                ("large", reference_large, "hub, sharded"),
                                ("windowed", reference_model(tokenizer, sliding_window=8), "transformers 5"),
                                ("windowed, large", reference_model(tokenizer, True, sliding_window=8),
                                 "transformers >= 4.52 in memory")]:
        made[name] = (write_folder(tmp_path_factory.mktemp("pg2"), model, tokenizer, layout), model)
    return made


# ---------------------------------------------------------------- parity with transformers, every layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loaded_logits_equal_reference(tmp_path, tokenizer, reference, layout):
    folder = write_folder(tmp_path, reference, tokenizer, layout)
    model, processor = nanopali.load(folder, dtype="float32")
    assert type(model.language_model) is Gemma2ForCausalLM
    assert model.config.text.query_pre_attn_scalar != model.config.text.head_dim
    inputs = processor(images(), PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "prompts of different lengths"
    with torch.no_grad():
        got = model(**inputs)
        expected = reference(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_greedy_answers_equal_reference_generate(folders):
    folder, reference = folders["large"]
    model, processor = nanopali.load(folder, dtype="float32")
    got = nanopali.generate(model, processor, images(), PROMPTS, max_new_tokens=10)
    assert got == reference_answers(reference, processor, images(), PROMPTS)
    assert got[0] != got[1] and all(len(answer) > 5 for answer in got), "the answers should vary"


# ---------------------------------------------------------------- a sliding window shorter than the sequence


def gemma2_pair(window: int, std: float | None = None):
    "transformers' Gemma2ForCausalLM and ours with the same weights (its initialisation, or normal(0, std))."
    config = Gemma2Config.tiny(sliding_window=window)
    torch.manual_seed(0)
    reference = transformers.Gemma2ForCausalLM(reference_gemma_config(config)).eval()
    if std is not None:
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name != "lm_head.weight":
                    p.normal_(0.0, std)
        reference.tie_weights()
    ours = Gemma2ForCausalLM(config).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}, strict=True)
    return ours, reference


def left_padded_prompts(vocab_size: int, length: int = 12, pads: int = 3):
    "Two prompts of `length` tokens, the second with `pads` <pad> tokens on its left: (ids, attention_mask)."
    ids = torch.randint(3, vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pads], ids[1, :pads] = 0, 0
    return ids, mask


def test_text_model_with_a_short_window_gives_the_reference_logits():
    ours, reference = gemma2_pair(window=4)
    ids, mask = left_padded_prompts(ours.config.vocab_size)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask)
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(-1)).logits
        ours.config.sliding_window = None  # read at every call: the window turned off
        unwindowed = ours(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got[real] - unwindowed[real]).abs().max() > 1e-3, "the window must change these logits"


def test_text_model_with_a_short_window_decodes_as_the_reference():
    "The cached decode steps are windowed too: 12 prompt tokens and 10 new ones through a window of 4."
    ours, reference = gemma2_pair(window=4, std=0.3)
    ids, mask = left_padded_prompts(ours.config.vocab_size)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      pad_token_id=0, eos_token_id=1)[:, ids.shape[1]:]
    embeds = ours.model.embed(ids)
    got = generation_loop(ours, embeds, mask, max_new_tokens=10)
    assert torch.equal(got, expected)
    assert torch.equal(generation_loop(ours, embeds, mask, max_new_tokens=10, use_cache=False), got)
    assert not torch.equal(got[0], got[1]), "the continuations should vary"


def test_paligemma_2_with_a_window_shorter_than_its_image_gives_the_reference_logits(folders):
    """The prefix (image and prompt) is exempt from the window, so a prompt alone never meets it: answers as in
    training (token type 1) follow, longer than the window, whose tokens see only the window in sliding layers."""
    folder, reference = folders["windowed"]
    model, processor = nanopali.load(folder, dtype="float32")
    assert model.config.text.sliding_window == 8 < IMAGE_TOKENS
    suffixes = ["the cat is on the sofa ; a red circle ; yes", "no ; blue ; the cat is on the sofa"]
    batch = processor(images(), PROMPTS, suffixes)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
    assert (inputs["token_type_ids"].sum(1) > 8).all(), "suffixes longer than the window"
    with torch.no_grad():
        got = model(**inputs)
        expected = reference(**inputs).logits
        model.config.text.sliding_window = None  # read at every call: the window turned off
        unwindowed = model(**inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got[real] - unwindowed[real]).abs().max() > 1e-3, "the window must change these logits"


def test_paligemma_2_with_a_window_shorter_than_its_image_answers_as_the_reference(folders):
    "Each decode step is a suffix query, for which the sliding layers cut off the image: the same cut as the reference."
    folder, reference = folders["windowed, large"]
    model, processor = nanopali.load(folder, dtype="float32")
    got = nanopali.generate(model, processor, images(), PROMPTS, max_new_tokens=12)
    assert got == reference_answers(reference, processor, images(), PROMPTS, max_new_tokens=12)
    assert got[0] != got[1], "the answers should vary"
    model.config.text.sliding_window = None  # read at every call: the window turned off
    assert nanopali.generate(model, processor, images(), PROMPTS, max_new_tokens=12) != got, "the window matters"


# ---------------------------------------------------------------- save


def test_a_folder_written_by_save_is_read_by_transformers(tmp_path, tokenizer):
    config = PaliGemmaConfig(SiglipVisionConfig.tiny(), Gemma2Config.tiny(vocab_size=tokenizer.get_vocab_size()),
                             image_token_index=tokenizer.token_to_id("<image>"))
    assert config.text.sliding_window < IMAGE_TOKENS  # the window matters in this check too
    torch.manual_seed(0)
    ours = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    processor = PaliGemmaProcessor(tokenizer, num_image_tokens=IMAGE_TOKENS, image_size=(56, 56))
    save(ours, processor, tmp_path)
    reference = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path,
                                                                               attn_implementation="eager").eval()
    assert reference.config.text_config.model_type == "gemma2"
    assert reference.config.text_config.layer_types == config.text.layer_types
    inputs = processor(images(), PROMPTS)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)[real], reference(**inputs).logits[real], atol=1e-5, rtol=0)
    again, _ = load(tmp_path, dtype="float32")
    assert again.config == config
    assert again.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


# ---------------------------------------------------------------- the published configs and sizes


GEMMA2_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping",
                 "final_logit_softcapping", "sliding_window", "layer_types", "rms_norm_eps", "max_position_embeddings",
                 "pad_token_id", "bos_token_id", "eos_token_id"]


def paligemma2_config(size: str) -> dict:
    "A config.json of PaliGemma 2 at 224 px in size 3b, 10b or 28b: the 3B's, with the text model of that size."
    config = json.loads(json.dumps(PALIGEMMA2_3B_224_CONFIG))
    config["text_config"].update(PALIGEMMA2_SIZES[size])
    hidden = PALIGEMMA2_SIZES[size]["hidden_size"]
    config["projection_dim"] = config["vision_config"]["projection_dim"] = hidden
    return config


def test_the_terse_3b_config_reads_as_transformers_reads_it():
    ours = PaliGemmaConfig.from_dict(PALIGEMMA2_3B_224_CONFIG).text
    ref = transformers.PaliGemmaConfig(**PALIGEMMA2_3B_224_CONFIG).text_config
    assert type(ours) is Gemma2Config and ref.model_type == "gemma2"
    for name in GEMMA2_FIELDS:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 10000.0
    assert ours.hidden_act == ref.hidden_activation == "gelu_pytorch_tanh"
    # fields the file leaves out, taken from the defaults of 4.47, the version that wrote it
    assert (ours.num_attention_heads, ours.head_dim, ours.hidden_size) == (8, 256, 2304)
    assert ours.layer_types[:2] == ["sliding_attention", "full_attention"] and len(ours.layer_types) == 26


def test_a_config_written_by_transformers_4_46_takes_its_defaults():
    "Before 4.47, Gemma2Config's default was 16 heads: a terse file written then means 16, not today's 8."
    older = {**PALIGEMMA2_3B_224_CONFIG, "transformers_version": "4.46.0"}
    text = PaliGemmaConfig.from_dict(older).text
    assert text.num_attention_heads == 16
    # what the file says stays as it says
    assert (text.hidden_size, text.num_key_value_heads, text.query_pre_attn_scalar, text.num_hidden_layers,
            text.intermediate_size) == (2304, 4, 256, 26, 9216)


@pytest.mark.parametrize("size, total", [("3b", 3_032_242_416), ("10b", 9_662_638_832), ("28b", 27_650_487_024)])
def test_parameter_counts_equal_transformers_and_the_published_ones(size, total):
    config = paligemma2_config(size)
    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(config))
        ref = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**config))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == total
    # keras-hub counts the vocabulary's 257,152 rows, without the 64 rows of padding the checkpoints hold
    published = {"3b": 3_032_094_960, "10b": 9_662_409_456, "28b": 27_650_192_112}[size]
    assert count - (257216 - 257152) * ours.config.text.hidden_size == published


def test_the_3b_model_has_transformers_names_and_shapes():
    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(PALIGEMMA2_3B_224_CONFIG))
        ref = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**PALIGEMMA2_3B_224_CONFIG))
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {canonical_name(k): v.shape for k, v in ref.state_dict().items()}
    assert ref_shapes.pop("lm_head.weight") == ours_shapes["language_model.model.embed_tokens.weight"]
    assert ours_shapes == ref_shapes
    assert ours_shapes["language_model.model.layers.0.self_attn.q_proj.weight"] == (8 * 256, 2304)
    assert "language_model.model.layers.25.post_feedforward_layernorm.weight" in ours_shapes
    assert ours_shapes["multi_modal_projector.linear.weight"] == (2304, 1152)  # the text width, not the stale 2048


# ---------------------------------------------------------------- int8, attention maps, the command line


def answers(model, processor, use_cache=True, max_new_tokens=10):
    "Greedy answers to PROMPTS about the two images, with or without the KV cache."
    inputs = processor(images(), PROMPTS)
    embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
    ids = generate_tokens(model.language_model, embeds, inputs["attention_mask"], inputs["token_type_ids"],
                          max_new_tokens=max_new_tokens, use_cache=use_cache)
    return [processor.decode(row) for row in ids]


def test_an_int8_paligemma_2_generates_alike_with_and_without_the_cache(folders):
    model, processor = nanopali.load(folders["windowed, large"][0], dtype="float32")
    quantize_int8(model)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * 7 + 1  # 4 layers x 7, and the head
    with_cache = answers(model, processor)
    assert with_cache == answers(model, processor, use_cache=False)
    assert with_cache == nanopali.generate(model, processor, images(), PROMPTS, max_new_tokens=10)
    assert with_cache[0] != with_cache[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_logits_stay_close_to_the_unquantized_model(folders, dtype):
    """Within a few percent (measured: 2.5%; bfloat16 alone is 1.8% from float32), and nearly always the same top
    token. The int8 model has generated first (under inference_mode), as in a session that answers, then scores."""
    model, processor = nanopali.load(folders["windowed"][0], dtype=dtype)
    inputs = processor(images(), PROMPTS)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        before = model(**inputs)[real].float()
    quantize_int8(model)
    nanopali.generate(model, processor, images(), PROMPTS, max_new_tokens=2)
    with torch.no_grad():
        after = model(**inputs)[real].float()
    assert ((after - before).norm() / before.norm()).item() < 0.05
    assert (before.argmax(-1) == after.argmax(-1)).float().mean() > 0.9


def test_attention_maps_work_and_do_not_change_the_answer(folders):
    folder, _ = folders["windowed, large"]
    model, processor = nanopali.load(folder, dtype="float32")
    image, prompt = Image.open(IMAGE_FILES[1]), PROMPTS[1]
    answer = generate_with_attention(model, processor, image, prompt, max_new_tokens=8)
    assert answer.text == nanopali.generate(model, processor, [image], [prompt], max_new_tokens=8)[0]
    L, window = processor(image, prompt)["input_ids"].shape[1], model.config.text.sliding_window
    assert answer.image_attention.shape == (len(answer.tokens), 4, 4, 4, 4)
    sliding = [i for i, kind in enumerate(model.config.text.layer_types) if kind == "sliding_attention"]
    full = [i for i in range(4) if i not in sliding]
    for j, row in enumerate(answer.rows):
        assert row.shape == (4, 4, L + j)
        torch.testing.assert_close(row.sum(-1), torch.ones(4, 4), atol=1e-5, rtol=0)
        assert (row[full] > 0).all()  # global layers see everything before
        if j == 0:  # the last prompt token, itself prefix, sees the whole prefix in every layer
            assert (row[sliding] > 0).all()
        else:  # a generated token's sliding layers see only the window's last tokens
            query = L - 1 + j
            assert (row[sliding][..., : query - window + 1] == 0).all()
            assert (row[sliding][..., query - window + 1:] > 0).all()


def cli_answer(capsys, argv) -> tuple[str, str]:
    "Run the command line in this process: (the answer line, everything printed)."
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    image_line = next(i for i, line in enumerate(lines) if line.startswith("image: "))
    return lines[image_line + 1], out


def test_the_command_line_answers_with_a_paligemma_2_folder_and_with_int8(folders, capsys):
    folder, _ = folders["large"]
    argv = ["--weights", str(folder), "--image", str(IMAGE_FILES[0]), "--prompt", "caption en", "--dtype", "float32",
            "--max-new-tokens", "8"]
    model, processor = nanopali.load(folder, dtype="float32")
    plain = nanopali.generate(model, processor, images()[:1], ["caption en"], max_new_tokens=8)[0]
    quantized = nanopali.generate(quantize_int8(model), processor, images()[:1], ["caption en"], max_new_tokens=8)[0]

    assert plain.strip() and quantized.strip(), "answers to print"
    line, out = cli_answer(capsys, argv)
    assert line == plain.strip()
    assert "int8" not in out
    line, out = cli_answer(capsys, argv + ["--int8"])
    assert "int8: the language model's weights quantized in" in out
    assert line == quantized.strip()


# ---------------------------------------------------------------- refusals: one clear line each


@pytest.mark.parametrize("key, value, says", [
    ("model_type", "gemma3_text", "text model 'gemma3_text' is not supported"),
    ("layer_types", ["sliding_attention", "full_attention", "sliding_attention"], "layer_types must give one of"),
    ("attn_logit_softcapping", 0, "attn_logit_softcapping must be a positive number or None"),
    ("sliding_window", -1, "sliding_window"),
    ("query_pre_attn_scalar", 0, "query_pre_attn_scalar"),
])
def test_configs_that_cannot_work_are_refused_in_one_line(tmp_path, tokenizer, reference, key, value, says):
    folder = write_folder(tmp_path, reference, tokenizer, "transformers 5")
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["model_type"] == "gemma2"
    config["text_config"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / 'config.json'}: ") and says in message, message
    assert "\n" not in message

"""Lesson 07 against the reference: transformers' PaliGemmaForConditionalGeneration, end to end.

Tiny random PaliGemmas made by transformers are saved in the three tensor-name layouts
found in the wild (one of them sharded); nanopali.load must give the same logits
(float32, 1e-5) and nanopali.generate the same greedy answers as the reference."""

import errno
import json
import os
import re
import stat

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import nanopali
from nanopali.bridge import build_tokenizer
from nanopali.decoder import GemmaConfig
from nanopali.paligemma import (
    PALIGEMMA_3B_PT_224_CONFIG,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    canonical_name,
    check_save_folder,
    load,
    save,
)
from nanopali.patches import ImageFileError, SiglipVisionConfig

from conftest import IMAGES

transformers = pytest.importorskip("transformers")

TEXTS = ["caption en", "answer en what color is the circle?", "detect circle ; square", "a red circle", "yes",
         "no", "blue", "answer en is there a cat?", "the cat is on the sofa"] * 10
PROMPTS = ["caption en", "answer en what color is the circle on the left?"]
IMAGE_FILES = [IMAGES / "chelsea.png", IMAGES / "rocket.jpg"]
TEXT_CONFIGS = {"multi-query": {"num_key_value_heads": 1}, "grouped-query": {"num_key_value_heads": 2}}


def reference_model(tokenizer, kv_heads, large_weights=False, attn_implementation="eager"):
    """A tiny random PaliGemma. The reference's own initialisation (std 0.02) for logit comparisons; large weights
    (std 0.3) for generation, so that greedy answers vary with the input. Large weights also amplify rounding:
    the float32 islands both implementations share (softmax, RMSNorm, RoPE angles) then differ by ~1e-5 after a few
    layers even in float64, so logits are compared at 1e-5 on the realistic initialisation only."""
    vocab = tokenizer.get_vocab_size()
    config = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, patch_size=14, image_size=56, vision_use_head=False),
        text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, vocab_size=vocab),
        image_token_index=tokenizer.token_to_id("<image>"), projection_dim=64, hidden_size=64, vocab_size=vocab)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    if large_weights:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "lm_head.weight":
                    p.normal_(0.0, 0.3)
        model.tie_weights()
    return model


def write_folder(folder, reference, tokenizer, layout):
    "The reference model's weights under one of the published layouts, plus tokenizer and image settings."
    reference.save_pretrained(folder)  # transformers 5: vision_tower.*, language_model.model.*
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "padding_side": "left"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_seq_length": 16, "size": {"height": 56, "width": 56}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "rescale_factor": 1 / 255, "resample": 3, "processor_class": "PaliGemmaProcessor"}))
    if layout == "transformers 5":
        return folder
    tensors = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    if layout == "hub, sharded":
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
        names = sorted(renamed)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            save_file({k: renamed[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    elif layout == "transformers >= 4.52 in memory":
        renamed = {("model." + k).replace("model.language_model.model.", "model.language_model."): v
                   for k, v in tensors.items()}
        renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def reference(tokenizer):
    return {name: reference_model(tokenizer, settings["num_key_value_heads"])
            for name, settings in TEXT_CONFIGS.items()}


@pytest.fixture(scope="module")
def reference_large(tokenizer):
    return {name: reference_model(tokenizer, settings["num_key_value_heads"], large_weights=True)
            for name, settings in TEXT_CONFIGS.items()}


LAYOUTS = ["transformers 5", "hub, sharded", "transformers >= 4.52 in memory"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("text", list(TEXT_CONFIGS))
def test_loaded_logits_equal_reference(tmp_path, tokenizer, reference, layout, text):
    folder = write_folder(tmp_path, reference[text], tokenizer, layout)
    model, processor = nanopali.load(folder, dtype="float32")
    inputs = processor([Image.open(f) for f in IMAGE_FILES], PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "prompts of different lengths"
    with torch.no_grad():
        got = model(**inputs)
        expected = reference[text](**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("text", list(TEXT_CONFIGS))
def test_greedy_answers_equal_reference_generate(tmp_path, tokenizer, reference_large, text):
    folder = write_folder(tmp_path, reference_large[text], tokenizer, "hub, sharded")
    model, processor = nanopali.load(folder, dtype="float32")
    images = [Image.open(f) for f in IMAGE_FILES]
    got = nanopali.generate(model, processor, images, PROMPTS, max_new_tokens=10)

    inputs = processor(images, PROMPTS)
    out = reference_large[text].generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=1)
    expected = [processor.decode(row) for row in out[:, inputs["input_ids"].shape[1]:]]
    assert got == expected
    assert got[0] != got[1] and all(len(answer) > 5 for answer in got), "the answers should vary"


def test_a_folder_written_by_save_is_read_by_transformers(tmp_path, tokenizer):
    config = PaliGemmaConfig.from_dict({"vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                          "num_hidden_layers": 2, "num_attention_heads": 4,
                                                          "patch_size": 14, "image_size": 56},
                                        "text_config": {"hidden_size": 64, "intermediate_size": 128,
                                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                                        "num_key_value_heads": 1, "head_dim": 16,
                                                        "vocab_size": tokenizer.get_vocab_size()},
                                        "projection_dim": 64, "image_token_index": tokenizer.token_to_id("<image>")})
    torch.manual_seed(0)
    ours = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    processor = nanopali.paligemma.PaliGemmaProcessor(tokenizer, num_image_tokens=16, image_size=(56, 56))
    save(ours, processor, tmp_path)
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = processor([Image.open(f) for f in IMAGE_FILES], PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)[inputs["attention_mask"].bool()],
                                   ref(**inputs).logits[inputs["attention_mask"].bool()], atol=1e-5, rtol=0)
    again, _ = load(tmp_path, dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_real_3b_model_has_the_hubs_names_and_shapes():
    config = PaliGemmaConfig.from_dict(PALIGEMMA_3B_PT_224_CONFIG)
    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(config)
        ref = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**PALIGEMMA_3B_PT_224_CONFIG))
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {canonical_name(k): v.shape for k, v in ref.state_dict().items()}
    assert ref_shapes.pop("lm_head.weight") == ours_shapes["language_model.model.embed_tokens.weight"]
    assert ours_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == 2_923_466_480
    # the hub's own names (the old layout) map onto ours too
    assert canonical_name("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight") in ours_shapes
    assert canonical_name("language_model.model.layers.0.self_attn.q_proj.weight") in ours_shapes
    assert canonical_name("multi_modal_projector.linear.weight") in ours_shapes


def test_terse_config_takes_the_reference_defaults():
    config = PaliGemmaConfig.from_dict(PALIGEMMA_3B_PT_224_CONFIG)
    ref = transformers.PaliGemmaConfig(**PALIGEMMA_3B_PT_224_CONFIG)
    assert config.text.head_dim == ref.text_config.head_dim == 256
    assert config.text.rms_norm_eps == ref.text_config.rms_norm_eps
    assert config.text.rope_theta == ref.text_config.rope_parameters["rope_theta"] == 10000.0
    assert config.vision.image_size == ref.vision_config.image_size == 224
    assert config.vision.layer_norm_eps == ref.vision_config.layer_norm_eps
    assert config.vision.intermediate_size == 4304 and config.image_token_index == 257152
    for size, tokens in [(448, 1024), (896, 4096)]:
        bigger = json.loads(json.dumps(PALIGEMMA_3B_PT_224_CONFIG))
        bigger["vision_config"]["image_size"] = size
        assert PaliGemmaConfig.from_dict(bigger).vision.num_patches == tokens


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def good_folder(tmp_path, tokenizer, reference):
    return write_folder(tmp_path / "model", reference["multi-query"], tokenizer, "hub, sharded")


def test_missing_folder_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder. Download a PaliGemma checkpoint"):
        load(tmp_path / "paligemma-3b-pt-224")


def test_missing_weights_are_reported(good_folder):
    for f in good_folder.glob("model*.safetensors*"):
        f.unlink()
    before = snapshot(good_folder)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load(good_folder)
    assert snapshot(good_folder) == before


def test_missing_shard_is_named(good_folder):
    (good_folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors, which is missing"):
        load(good_folder)


def test_truncated_shard_is_reported(good_folder):
    shard = good_folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = snapshot(good_folder)
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors: not a readable safetensors file"):
        load(good_folder)
    assert snapshot(good_folder) == before


def test_corrupt_file_is_reported(good_folder):
    (good_folder / "model-00002-of-00002.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(good_folder)


def test_config_that_does_not_match_the_tensors_names_them(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (good_folder / "config.json").write_text(json.dumps(config))
    before = snapshot(good_folder)
    with pytest.raises(ValueError, match=r"6 with the wrong shape: .*mlp.down_proj.weight: \(64, 128\) in the file, "
                                         r"\(64, 96\) in the model"):
        load(good_folder)
    assert snapshot(good_folder) == before


def test_unexpected_tensors_are_named(good_folder):
    "A SigLIP pooling head, which PaliGemma does not have, must not be silently dropped."
    index = json.loads((good_folder / "model.safetensors.index.json").read_text())
    shard = good_folder / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["vision_tower.vision_model.head.probe"] = shard.name
    (good_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"1 unexpected: vision_tower.vision_model.head.probe"):
        load(good_folder)


def test_untied_head_is_refused(tmp_path, tokenizer, reference):
    folder = write_folder(tmp_path, reference["multi-query"], tokenizer, "transformers >= 4.52 in memory")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="untied head is not supported"):
        load(folder)


@pytest.mark.parametrize("model_type, says", [
    ("gemma3", "model_type is 'gemma3': this is not a PaliGemma checkpoint"),  # a Gemma 3 folder, as published
    ("paligemma", "text model 'gemma3_text' is not supported"),  # a PaliGemma with a Gemma 3 text model
])
def test_a_gemma_3_based_config_is_refused_in_one_line(good_folder, model_type, says):
    config = json.loads((good_folder / "config.json").read_text())
    config["model_type"] = model_type
    config["text_config"]["model_type"] = "gemma3_text"
    (good_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^{re.escape(str(good_folder / 'config.json'))}: {re.escape(says)}") as error:
        load(good_folder)
    assert "\n" not in str(error.value)


def test_float16_on_cpu_and_unavailable_devices_are_refused(good_folder):
    with pytest.raises(ValueError, match="float16 on the CPU is refused"):
        load(good_folder, device="cpu", dtype=torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available on this machine"):
            load(good_folder, device="cuda")


def test_bfloat16_is_the_default_and_nothing_is_float32(good_folder):
    model, _ = load(good_folder, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_an_image_that_cannot_be_read_is_reported(good_folder, tmp_path):
    model, processor = load(good_folder, dtype="float32")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageFileError, match="notes.png: not an image file"):
        nanopali.generate(model, processor, [bad], ["caption en"])


def test_a_tokenizer_that_does_not_belong_to_the_config_is_refused(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["image_token_index"] = 257152  # the real model's id, not this tokenizer's
    (good_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="<image> id is .* but config.json says image_token_index 257152"):
        load(good_folder)


@pytest.mark.parametrize("content, message", [("", "config.json: not valid JSON"), ("[]", "expected a JSON object"),
                                              ('{"text_config": null}', "text_config must be a JSON object"),
                                              ('{"text_config": {"hidden_size": "64"}}',
                                               "text_config.hidden_size is '64': expected a positive whole number"),
                                              ('{"text_config": {"num_key_value_heads": 0}}',
                                               "num_key_value_heads is 0: expected a positive whole number"),
                                              ('{"text_config": {"model_type": "gemma2"}}',
                                               "it has no vision_config: a PaliGemma config.json describes both"),
                                              ('{"vision_config": {}}', "it has no text_config")])
def test_damaged_config_json_is_named(good_folder, content, message):
    (good_folder / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load(good_folder)


@pytest.mark.parametrize("file", ["tokenizer.json", "preprocessor_config.json", "tokenizer_config.json"])
def test_damaged_json_files_are_named(good_folder, file):
    (good_folder / file).write_text("{ truncated")
    with pytest.raises(ValueError, match=f"{file}: not"):
        load(good_folder)


def test_folders_mixing_two_checkpoints_are_refused(good_folder, tmp_path, tokenizer, reference):
    other = write_folder(tmp_path / "other", reference["grouped-query"], tokenizer, "transformers 5")
    (good_folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.index.json"):
        load(good_folder)


def test_a_tensor_stored_twice_is_refused(good_folder):
    shard = good_folder / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    twin_name = "model." + name.replace("vision_tower.vision_model.", "vision_tower.")
    tensors[twin_name] = tensors[name].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((good_folder / "model.safetensors.index.json").read_text())
    index["weight_map"][twin_name] = shard.name
    (good_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="the same tensor under two names"):
        load(good_folder)


def test_an_index_that_does_not_match_its_shards_is_refused(good_folder):
    index = json.loads((good_folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (good_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="the index lists tensors no shard holds: ghost.weight"):
        load(good_folder)
    index["weight_map"].pop("ghost.weight")
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-00002-of-00002.safetensors"  # the wrong shard
    (good_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="the index puts it in model-00002-of-00002.safetensors"):
        load(good_folder)


# save never writes over what exists unless told to (overwrite=True), and then replaces the folder as a whole.

@pytest.fixture(scope="module")
def tiny_saveable(tokenizer):
    "A tiny PaliGemma of nanopali's own, and its processor: what save is given."
    config = PaliGemmaConfig(SiglipVisionConfig.tiny(), GemmaConfig.tiny(vocab_size=tokenizer.get_vocab_size()),
                             image_token_index=tokenizer.token_to_id("<image>"))
    torch.manual_seed(0)
    return (PaliGemmaForConditionalGeneration(config).eval(),
            nanopali.paligemma.PaliGemmaProcessor(tokenizer, num_image_tokens=16, image_size=(56, 56)))


def contents(folder):
    "Every file under folder, with its bytes: what must not change."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SAVED_FILES = ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json"]


def test_save_refuses_a_folder_that_holds_files_and_changes_nothing(good_folder, tiny_saveable):
    before, beside = contents(good_folder), sorted(os.listdir(good_folder.parent))
    with pytest.raises(FileExistsError, match=f"^{good_folder} already holds files: pass overwrite=True to replace "
                                              "the whole folder, or choose a new folder$"):
        save(*tiny_saveable, good_folder)
    assert contents(good_folder) == before and sorted(os.listdir(good_folder.parent)) == beside


def test_save_refuses_a_file_even_with_overwrite(good_folder, tiny_saveable):
    config = good_folder / "config.json"
    before = config.read_bytes()
    for overwrite in [False, True]:
        with pytest.raises(FileExistsError, match=f"^{config} is a file, not a folder: choose another path"):
            save(*tiny_saveable, config, overwrite=overwrite)
    assert config.read_bytes() == before


def test_save_accepts_an_empty_folder_and_a_new_one(tmp_path, tiny_saveable):
    (tmp_path / "empty").mkdir()
    for folder in [tmp_path / "empty", tmp_path / "new" / "deeper"]:
        assert save(*tiny_saveable, folder) == folder
        assert sorted(os.listdir(folder)) == SAVED_FILES
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"] and os.listdir(tmp_path / "new") == ["deeper"]
    model, _ = load(tmp_path / "empty", dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_saveable[0].state_dict().values()))


def test_overwrite_replaces_the_whole_folder(good_folder, tiny_saveable):
    (good_folder / "eval.json").write_text("{}")  # describes the old weights, like lesson 08's
    (good_folder / ".cache").mkdir()  # what `hf download --local-dir` leaves in a model's folder
    (good_folder / ".cache" / "download.lock").write_text("")
    save(*tiny_saveable, good_folder, overwrite=True)
    assert sorted(os.listdir(good_folder)) == SAVED_FILES  # no old shard, index, eval.json or log survives
    assert os.listdir(good_folder.parent) == [good_folder.name]  # nothing temporary left beside it
    model, _ = load(good_folder, dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_saveable[0].state_dict().values()))


def test_overwrite_replaces_only_a_models_own_folder(tmp_path, good_folder, tiny_saveable):
    "A folder of models (weights/), or of anything else, is never replaced as a whole: nothing in it changes."
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "README.md").write_text("mine")
    os.rename(good_folder, weights / "model")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for folder, says in [(weights, r"it holds folders \(model\)"), (tmp_path / "notes", "it has no config.json")]:
        with pytest.raises(FileExistsError, match=f"is not a model's folder \\({says}"):
            save(*tiny_saveable, folder, overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_refuses_the_current_folder(tmp_path, tiny_saveable, monkeypatch):
    (tmp_path / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for folder in [".", tmp_path, tmp_path.parent]:
        with pytest.raises(FileExistsError, match="current folder.*overwrite=True would delete all of it"):
            save(*tiny_saveable, folder, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "mine" and os.listdir(tmp_path) == ["mine.txt"]


def test_check_save_folder_says_in_advance_what_save_would_do(good_folder, tmp_path):
    "lesson 08's trainer asks before an hour of training: the same answers as save, and nothing written."
    before = contents(good_folder)
    assert check_save_folder(tmp_path / "new") == (tmp_path / "new").resolve() and not (tmp_path / "new").exists()
    assert check_save_folder(good_folder, overwrite=True) == good_folder.resolve()
    with pytest.raises(FileExistsError, match="already holds files: pass overwrite=True"):
        check_save_folder(good_folder)
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        check_save_folder(good_folder / "config.json", overwrite=True)
    assert contents(good_folder) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_old_folder_as_it_was_and_nothing_beside_it(tmp_path, tiny_saveable, monkeypatch,
                                                                              failure, overwrite):
    "A full disk or a Ctrl-C halfway (safetensors writing the weights): nothing of the user's changes."
    folder = tmp_path / "model"
    folder.mkdir()
    if overwrite:
        save(*tiny_saveable, folder)
        (folder / "eval.json").write_text("{}")
    before = contents(folder)

    def fail(*args, **kwargs):
        raise failure
    monkeypatch.setattr(nanopali.paligemma, "save_file", fail)
    with pytest.raises(type(failure)):
        save(*tiny_saveable, folder, overwrite=overwrite)
    assert contents(folder) == before and os.listdir(tmp_path) == ["model"]


def test_a_failure_while_moving_into_place_puts_the_old_folder_back(good_folder, tiny_saveable, monkeypatch):
    before, rename = contents(good_folder), os.rename

    def fail_on_the_new_folder(source, target):
        if ".saving-" in str(source):
            raise OSError(errno.EIO, "Input/output error")
        rename(source, target)
    monkeypatch.setattr(nanopali.paligemma.os, "rename", fail_on_the_new_folder)
    with pytest.raises(OSError, match="Input/output error"):
        save(*tiny_saveable, good_folder, overwrite=True)
    assert contents(good_folder) == before and os.listdir(good_folder.parent) == [good_folder.name]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_get_the_users_normal_permissions(tmp_path, tiny_saveable, umask):
    old = os.umask(umask)
    try:
        folder = save(*tiny_saveable, tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert {name: stat.S_IMODE((folder / name).stat().st_mode) for name in SAVED_FILES} == \
        {name: 0o666 & ~umask for name in SAVED_FILES}


# load refuses weights that are NaN or infinite, naming the tensor and its file.

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # read as stored, and cast chunk by chunk
def test_nan_or_infinite_weights_are_refused_by_name(good_folder, bad, dtype):
    shard = good_folder / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[-1] = bad  # one number of one tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})
    before = contents(good_folder)
    with pytest.raises(ValueError, match=f"^{shard}: {re.escape(name)}: it holds NaN or infinite numbers: the file is "
                                         "damaged, or the model diverged in training. Download it again, or use "
                                         "another checkpoint$"):
        load(good_folder, dtype=dtype)
    assert contents(good_folder) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_finite_check_finds_one_bad_number_anywhere(dtype):
    "aminmax propagates NaN: checked at the start, the middle and the tail of the vectorised loops, on every dtype."
    from nanopali.paligemma import _check_finite
    for size in [1, 7, 1000, 100_003]:
        weights = torch.linspace(-3.0, 3.0, size, dtype=dtype)
        _check_finite(weights)
        for position in {0, size // 2, size - 1}:
            for bad in [float("nan"), float("inf"), -float("inf")]:
                broken = weights.clone()
                broken[position] = bad
                with pytest.raises(ValueError, match="holds NaN or infinite numbers"):
                    _check_finite(broken)
    _check_finite(torch.empty(0, dtype=dtype))


@pytest.mark.parametrize("key, value", [("rope_theta", 0), ("rope_theta", float("nan")), ("eos_token_id", None)])
def test_config_values_that_cannot_work_are_refused_by_name(good_folder, key, value):
    config = json.loads((good_folder / "config.json").read_text())
    config["text_config"].pop("rope_parameters", None)
    config["text_config"][key] = config["text_config"]["vocab_size"] if value is None else value
    (good_folder / "config.json").write_text(json.dumps(config))  # json writes NaN as NaN, and reads it back
    with pytest.raises(ValueError, match=f"config.json: .*{key}") as error:
        load(good_folder)
    assert "\n" not in str(error.value)


def test_a_file_or_a_bad_device_name_is_refused(good_folder):
    with pytest.raises(NotADirectoryError, match="is a file"):
        load(good_folder / "config.json")
    for device in ["gpu", "tpu:banana"]:
        with pytest.raises(ValueError, match="not a device name|not available"):
            load(good_folder, device=device)


def test_generate_refuses_empty_and_unordered_batches(good_folder):
    model, processor = load(good_folder, dtype="float32")
    with pytest.raises(ValueError, match="no prompts given"):
        nanopali.generate(model, processor, [], [])
    with pytest.raises(TypeError, match="a set has no order"):
        nanopali.generate(model, processor, set(IMAGE_FILES), PROMPTS)


# Lesson 07's exercises: each check accepts a right answer and refuses plausible wrong ones.

def _load_strictly(folder, files, strict=True):
    config = PaliGemmaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    state = {}
    for file in files:
        state.update({canonical_name(k): v for k, v in load_file(str(folder / file)).items()})
    model.load_state_dict(state, strict=strict, assign=True)
    return model


def _all_shards(folder):
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_exercise_layouts_are_the_ones_transformers_uses():
    "The in-memory layout the check of exercise 7.1 builds is transformers' own, name for name."
    from nanopali.exercises.lesson07 import _in_memory

    with torch.device("meta"):
        ours = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(PALIGEMMA_3B_PT_224_CONFIG))
        ref = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**PALIGEMMA_3B_PT_224_CONFIG))
    assert {_in_memory(n, vision_model=False) for n in ours.state_dict()} | {"lm_head.weight"} == set(ref.state_dict())


def test_check_canonical_accepts_canonical_name_and_refuses_the_hub_rename_alone(capsys):
    from nanopali.exercises.lesson07 import check_canonical

    assert check_canonical(canonical_name)
    assert not check_canonical(lambda n: n.replace("vision_tower.vision_model.", "vision_tower.", 1))
    assert "not right yet: transformers 4.52-4.57 in memory" in capsys.readouterr().out
    no_head = lambda n: "language_model.model.lm_head.weight" if n.endswith("lm_head.weight") else canonical_name(n)  # noqa: E731
    assert not check_canonical(no_head)
    assert "lm_head.weight" in capsys.readouterr().out


def test_check_load_sharded_accepts_all_shards_and_refuses_one(capsys):
    from nanopali.exercises.lesson07 import check_load_sharded

    assert check_load_sharded(lambda folder: _load_strictly(folder, _all_shards(folder)))
    first_only = lambda folder: _load_strictly(folder, _all_shards(folder)[:1], strict=False)  # noqa: E731
    assert not check_load_sharded(first_only)
    assert "never filled (still on the meta device)" in capsys.readouterr().out


def _diagnose(folder, rename=canonical_name, shapes=True):
    config = PaliGemmaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PaliGemmaForConditionalGeneration(config).state_dict().items()}
    found = {rename(k): tuple(v.shape) for k, v in load_file(str(folder / "model.safetensors")).items()}
    return {"missing": sorted(set(expected) - set(found)), "unexpected": sorted(set(found) - set(expected)),
            "wrong_shape": sorted(k for k in found if shapes and k in expected and found[k] != expected[k])}


def test_check_diagnose_accepts_a_right_report_and_refuses_wrong_ones(capsys):
    from nanopali.exercises.lesson07 import check_diagnose

    assert check_diagnose(_diagnose)
    assert not check_diagnose(lambda folder: _diagnose(folder, shapes=False))  # misses the wrong width
    assert "wrong_shape: got []" in capsys.readouterr().out
    assert not check_diagnose(lambda folder: _diagnose(folder, rename=lambda n: n))  # the file's names, unmapped
    assert "an intact checkpoint gave" in capsys.readouterr().out

"""Checks for lesson 07's exercises (notebooks/07_paligemma.ipynb). Hand-written; solutions in
notebooks/solutions/07_paligemma.ipynb."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanopali.decoder import GemmaConfig
from nanopali.paligemma import PALIGEMMA_3B_PT_224_CONFIG, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from nanopali.patches import SiglipVisionConfig

from . import exercise

__all__ = ["check_canonical", "check_load_sharded", "check_diagnose"]


@functools.lru_cache(maxsize=1)
def _names_3b() -> tuple[str, ...]:
    """Our parameter names of paligemma-3b-pt-224, built on the meta device (no memory). Its layers all have the
    same names but for their number, so two of each stack are enough and keep the check quick."""
    config = json.loads(json.dumps(PALIGEMMA_3B_PT_224_CONFIG))
    config["vision_config"]["num_hidden_layers"] = config["text_config"]["num_hidden_layers"] = 2
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(config))
    return tuple(model.state_dict())


def _hub(ours: str) -> str:
    "The hub's files: SigLIP under vision_tower.vision_model."
    return ours.replace("vision_tower.", "vision_tower.vision_model.", 1) if ours.startswith("vision_tower.") else ours


def _in_memory(ours: str, vision_model: bool) -> str:
    """transformers >= 4.52 in memory: everything under model., Gemma's body directly under language_model.
    4.52-4.57 kept SigLIP's vision_model segment, transformers 5 drops it."""
    name = "model." + (_hub(ours) if vision_model else ours)
    return name.replace("model.language_model.model.", "model.language_model.", 1)


def _layouts() -> dict[str, dict[str, str]]:
    "Each layout in the wild: its name of every tensor -> our name (lm_head.weight is the tied head, kept as is)."
    ours, head = _names_3b(), {"lm_head.weight": "lm_head.weight"}
    return {
        "the hub's files": {_hub(n): n for n in ours},
        "transformers 5's save_pretrained": {n: n for n in ours},
        "transformers 4.52-4.57 in memory": {**{_in_memory(n, True): n for n in ours}, **head},
        "transformers 5 in memory": {**{_in_memory(n, False): n for n in ours}, **head},
    }


@exercise("7.1")
def check_canonical(canonical) -> str:
    "canonical(name) must map every tensor name of paligemma-3b-pt-224, in each of four layouts, to our name."
    for layout, names in _layouts().items():
        for theirs, expected in names.items():
            got = canonical(theirs)
            assert got == expected, f"{layout}: canonical({theirs!r}) gave {got!r}, expected {expected!r}"
    assert canonical("language_model.lm_head.weight") == "lm_head.weight", (
        "canonical('language_model.lm_head.weight') should be 'lm_head.weight': it is the tied head, under Gemma")
    return (f"the tensor names of paligemma-3b-pt-224 ({len(_names_3b())} names, each stack cut to two layers) "
            "in four layouts")


def _tiny_checkpoint(seed: int = 0) -> tuple[PaliGemmaConfig, dict[str, torch.Tensor]]:
    "A tiny PaliGemma's config and its tensors under the hub's names (seeded: the same every time)."
    config = PaliGemmaConfig(SiglipVisionConfig.tiny(), GemmaConfig.tiny(vocab_size=400), image_token_index=399)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    return config, {_hub(k): v.detach().clone() for k, v in model.state_dict().items()}


@exercise("7.2")
def check_load_sharded(load_sharded) -> str:
    "load_sharded(folder) must read a folder whose tensors are split over two shards, listed by an index."
    config, tensors = _tiny_checkpoint()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[1::2], "model-00002-of-00002.safetensors": names[0::2]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        for file, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        model = load_sharded(folder)
    assert isinstance(model, PaliGemmaForConditionalGeneration), (
        f"load_sharded returned a {type(model).__name__}, expected the model (a PaliGemmaForConditionalGeneration)")
    state = model.state_dict()
    on_meta = [name for name, t in state.items() if t.is_meta]
    assert not on_meta, f"{len(on_meta)} tensors were never filled (still on the meta device), e.g. {on_meta[0]}"
    for name, tensor in tensors.items():
        ours = name.replace("vision_tower.vision_model.", "vision_tower.", 1)
        assert ours in state, f"the model has no parameter {ours}"
        assert torch.equal(state[ours], tensor), f"{ours} differs from the tensor stored as {name}"
    return f"all {len(tensors)} tensors of a two-shard folder loaded, each equal to the stored one"


@exercise("7.3")
def check_diagnose(diagnose) -> str:
    """diagnose(folder) must name what is wrong with a checkpoint: the parameters no tensor fills, the tensors
    that fill no parameter, and the tensors whose shape differs from the parameter's."""
    config, tensors = _tiny_checkpoint(seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        intact = diagnose(folder)
        assert isinstance(intact, dict) and set(intact) == {"missing", "unexpected", "wrong_shape"}, (
            f"diagnose should return a dict with the keys missing, unexpected and wrong_shape, got {intact!r}"[:300])
        found = {key: list(names) for key, names in intact.items() if names}
        problems = ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in found.items())
        assert not found, (f"an intact checkpoint gave {problems}: every list should be empty. Are the file's names "
                           "mapped to the model's?")
        tensors.pop("multi_modal_projector.linear.bias")  # lost
        tensors["language_model.model.layers.1.mlp.gate.weight"] = tensors.pop(  # misnamed
            "language_model.model.layers.1.mlp.gate_proj.weight")
        tensors["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 32)  # a pooling head PaliGemma lacks
        tensors["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(48)  # the wrong width
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        got = diagnose(folder)
    expected = {"missing": ["language_model.model.layers.1.mlp.gate_proj.weight", "multi_modal_projector.linear.bias"],
                "unexpected": ["language_model.model.layers.1.mlp.gate.weight", "vision_tower.head.probe"],
                "wrong_shape": ["vision_tower.post_layernorm.weight"]}
    assert isinstance(got, dict) and set(got) == set(expected), (
        f"diagnose should return a dict with the keys missing, unexpected and wrong_shape, got {got!r}")
    for key, names in expected.items():
        assert sorted(got[key]) == names, f"{key}: got {sorted(got[key])}, expected {names}"
    return "a lost, a misnamed, an extra and a misshapen tensor found, and nothing in an intact checkpoint"

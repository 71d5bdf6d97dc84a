"""Checks for lesson 13's exercises (notebooks/13_finetune.ipynb). Hand-written; solutions in
notebooks/solutions/13_finetune.ipynb."""

from pathlib import Path

import torch
from torch import nn

import nanopali
from nanopali.bridge import read_json
from nanopali.finetune import LORA_TARGETS, LoRALinear, add_lora, merge_lora
from nanopali.paligemma import PALIGEMMA_3B_PT_224_CONFIG, PaliGemmaConfig, PaliGemmaForConditionalGeneration

from . import exercise

SHIPPED = Path(__file__).resolve().parent.parent.parent / "weights" / "nanopali-shapes"


def _lora_count(config: PaliGemmaConfig, rank: int, targets) -> int:
    "What add_lora really adds, on a model that holds no numbers (the meta device)."
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    add_lora(model, rank, targets=targets)
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)


@exercise("13.1")
def check_lora_parameters(lora_parameters) -> str:
    configs = {"the shipped model": PaliGemmaConfig.from_dict(read_json(SHIPPED / "config.json")),
               "PaliGemma 3B": PaliGemmaConfig.from_dict(PALIGEMMA_3B_PT_224_CONFIG)}
    cases = [("the shipped model", 8, LORA_TARGETS), ("the shipped model", 3, ("q_proj", "v_proj")),
             ("PaliGemma 3B", 8, LORA_TARGETS), ("PaliGemma 3B", 16, ("k_proj",)),
             ("PaliGemma 3B", 4, ("o_proj", "down_proj")), ("PaliGemma 3B", 2, ("gate_proj", "up_proj"))]
    for name, rank, targets in cases:
        config = configs[name]
        got = lora_parameters(config.text, rank, tuple(targets))
        assert isinstance(got, int) or (hasattr(got, "__index__") and not isinstance(got, bool)), \
            f"lora_parameters returned a {type(got).__name__}, expected a whole number (int)"
        expected = _lora_count(config, rank, targets)
        hint = ""
        if "k_proj" in targets and got != expected:
            heads = config.text.num_attention_heads * config.text.head_dim
            hint = (f": k_proj maps {config.text.hidden_size} to num_key_value_heads * head_dim = "
                    f"{config.text.num_key_value_heads * config.text.head_dim} outputs, not {heads}")
        assert int(got) == expected, (f"{name}, rank {rank}, targets {', '.join(targets)}: {int(got):,}, expected "
                                      f"{expected:,}{hint}")
    big = configs["PaliGemma 3B"]
    with torch.device("meta"):
        total = sum(p.numel() for p in PaliGemmaForConditionalGeneration(big).parameters())
    full = _lora_count(big, 8, LORA_TARGETS)
    return (f"rank 8 on all seven of the 3B's linears trains {full:,} numbers, {full / total:.2%} of its "
            f"{total / 1e9:.2f} billion; the MLP's three take most of it")


@exercise("13.2")
def check_add_vision_lora(add_vision_lora) -> str:
    model, _ = nanopali.load(SHIPPED, dtype=torch.float32)
    plain = set(model.state_dict())
    linears = sorted(name for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and name.startswith("vision_tower.encoder.layers."))
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.vision_tower(pixels)
    names = add_vision_lora(model, rank=4, alpha=8.0)
    assert isinstance(names, (list, tuple)), f"add_vision_lora returned a {type(names).__name__}, expected a list"
    missing, extra = sorted(set(linears) - set(names)), sorted(set(names) - set(linears))
    assert not missing, f"{len(missing)} of SigLIP's linear layers not in the returned names, e.g. {missing[0]}"
    assert not extra, f"names returned that are not SigLIP's encoder linears: {extra[0]}"
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == linears, (f"the model's LoRALinear layers are not exactly SigLIP's {len(linears)} linears "
                                f"(found {len(wrapped)}, e.g. {(set(wrapped) ^ set(linears)).pop()})")
    for name in wrapped:
        inner = model.get_submodule(name).base
        assert type(inner) is nn.Linear, f"{name}: wrapped twice (its base is a {type(inner).__name__})"
    with torch.no_grad():
        after = model.vision_tower(pixels)
    assert torch.equal(before, after), "the tower answers differently before any training: a new LoRALinear must " \
                                       "change nothing (B starts at zero)"
    trained = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    merged = merge_lora(model)
    assert merged == len(linears) and set(model.state_dict()) == plain, \
        "after merge_lora the model's tensors are not the plain PaliGemma's"
    return (f"{len(linears)} linear layers of SigLIP wrapped ({trained:,} numbers to train at rank 4), the tower "
            "unchanged at the start, and merged back into a plain PaliGemma")

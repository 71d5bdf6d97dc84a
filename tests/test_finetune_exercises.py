"""Lesson 13's exercises: their checks accept a right answer and refuse the typical wrong ones, saying why.

The worked solutions (notebooks/solutions/13_finetune.ipynb) run under nbval; here, answers written to be
wrong in one way each."""

from torch import nn

from nanopali.exercises.lesson13 import check_add_vision_lora, check_lora_parameters
from nanopali.finetune import LORA_TARGETS, LoRALinear, replace_module

# ---------------------------------------------------------------- 13.1: LoRA's size from the config


def _lora_parameters(config, rank, targets=LORA_TARGETS, *, kv_as_queries=False, one_layer=False):
    "Right by default; each keyword makes one typical mistake."
    hidden, heads = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = heads if kv_as_queries else config.num_key_value_heads * config.head_dim
    mlp = config.intermediate_size
    shapes = {"q_proj": (hidden, heads), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (heads, hidden),
              "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}
    per_layer = sum(rank * sum(shapes[t]) for t in targets)
    return per_layer * (1 if one_layer else config.num_hidden_layers)


def test_exercise_13_1_accepts_the_count_from_the_config(capsys):
    assert check_lora_parameters(_lora_parameters)
    assert "Exercise 13.1: correct: rank 8 on all seven of the 3B's linears trains 9,805,824" in capsys.readouterr().out


def test_exercise_13_1_refuses_full_width_keys_and_values(capsys):
    assert not check_lora_parameters(lambda *a: _lora_parameters(*a, kv_as_queries=True))
    assert "k_proj maps 192 to num_key_value_heads * head_dim = 48 outputs" in capsys.readouterr().out


def test_exercise_13_1_refuses_one_layer_and_a_float(capsys):
    assert not check_lora_parameters(lambda *a: _lora_parameters(*a, one_layer=True))
    assert "not right yet: the shipped model, rank 8" in capsys.readouterr().out
    assert not check_lora_parameters(lambda *a: float(_lora_parameters(*a)))
    assert "expected a whole number" in capsys.readouterr().out


# ---------------------------------------------------------------- 13.2: LoRA on the vision tower


def _add_vision_lora(model, rank=8, alpha=16.0, *, projector=False, while_walking=False):
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and (n.startswith("vision_tower.encoder.layers.") or
                                              (projector and n.startswith("multi_modal_projector")))]
    if while_walking:  # replacing while walking the model also visits (and wraps) each new LoRALinear's base
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.startswith("vision_tower.encoder.layers."):
                replace_module(model, name, LoRALinear(module, rank, alpha))
                names.append(name + ".base")
                replace_module(model, name + ".base", LoRALinear(module, rank, alpha))
        return names
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return names


def test_exercise_13_2_accepts_siglips_linears(capsys):
    assert check_add_vision_lora(_add_vision_lora)
    assert "Exercise 13.2: correct: 24 linear layers of SigLIP wrapped" in capsys.readouterr().out


def test_exercise_13_2_refuses_the_projector_and_double_wrapping(capsys):
    assert not check_add_vision_lora(lambda m, rank, alpha: _add_vision_lora(m, rank, alpha, projector=True))
    assert "not SigLIP's encoder linears: multi_modal_projector.linear" in capsys.readouterr().out
    assert not check_add_vision_lora(lambda m, rank, alpha: _add_vision_lora(m, rank, alpha, while_walking=True))
    assert "not right yet" in capsys.readouterr().out


def test_exercise_13_2_refuses_a_changed_tower_and_no_names(capsys):
    def noisy(model, rank, alpha):
        names = _add_vision_lora(model, rank, alpha)
        model.get_submodule(names[0]).lora_B.data.fill_(0.1)
        return names

    assert not check_add_vision_lora(noisy)
    assert "B starts at zero" in capsys.readouterr().out
    assert not check_add_vision_lora(lambda m, rank, alpha: None)
    assert "expected a list" in capsys.readouterr().out

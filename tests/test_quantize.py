"""Lesson 10's weight-only int8: the rounding is within half a step, both paths of Int8Linear compute the dequantized
product, a quantized model generates consistently, and the shipped model keeps its answers."""

import pytest
import torch
from torch import nn

import nanopali
from nanopali.decoder import GemmaConfig
from nanopali.gemma import GemmaForCausalLM, generate_tokens
from nanopali.quantize import Int8Linear, quantize_int8, quantize_rows
from nanopali.train import evaluate

from conftest import SHIPPED


def test_rounding_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(300, 64) * torch.logspace(-3, 2, 300)[:, None]  # rows of very different sizes
    q, scale = quantize_rows(w, rows_per_step=7)  # several blocks, the last one partial
    assert q.dtype == torch.int8 and scale.shape == (300,)
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses the whole range
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-6 * w.abs().amax(dim=1, keepdim=True)).all()


def test_a_row_of_zeros_stays_zero():
    q, scale = quantize_rows(torch.zeros(2, 16))
    assert (q == 0).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize("rows", [1, 4, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_compute_the_dequantized_product(rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    layer = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(2, rows, 64, dtype=dtype)
    expected = x.float() @ (layer.weight_int8.float() * layer.scale[:, None]).T + linear.bias.float()
    got = layer(x)
    assert got.shape == (2, rows, 48) and got.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0.02)


def test_widths_the_kernel_cannot_take_use_the_safe_path():
    "The int8 kernel needs the input width to be a multiple of 16 (60 crashed the process): 60 must not reach it."
    linear = nn.Linear(60, 50)
    layer = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(1, 60)
    torch.testing.assert_close(layer(x), linear(x), atol=0.05, rtol=0.05)


def test_a_layer_first_run_in_inference_mode_still_runs_outside_it():
    "The shared buffer of the many-rows path is made once; made under inference_mode, later passes could not write it."
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(64, 48).weight)
    x = torch.randn(32, 64)  # 32 rows: the path that converts the weights into the buffer
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        second = layer(x)
    assert torch.equal(first, second)


def test_a_quantized_gemma_generates_alike_with_and_without_the_cache():
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig.tiny(num_key_value_heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    prompt = model.model.embed(torch.tensor([[2, 300, 301, 302, 303]]))
    quantize_int8(model)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1  # 2 layers x 7, and the head
    with_cache = generate_tokens(model, prompt, max_new_tokens=8)
    assert torch.equal(with_cache, generate_tokens(model, prompt, max_new_tokens=8, use_cache=False))


def test_the_shipped_model_keeps_its_answers():
    model, processor = nanopali.load(SHIPPED, device="cpu", dtype="float32")
    before = evaluate(model, processor, num_scenes=50)
    after = evaluate(quantize_int8(model), processor, num_scenes=50, batch_size=16)  # decoding through the kernel
    for task in before:
        assert abs(after[task] - before[task]) <= 0.03, (task, before[task], after[task])


def test_a_quantized_model_is_not_saved_as_a_checkpoint(tmp_path):
    "nanopali.save would write tensors no loader expects: it refuses, and says why."
    model, processor = nanopali.load(SHIPPED, device="cpu", dtype="float32")
    quantize_int8(model)
    with pytest.raises(ValueError, match="changed after loading .lesson 10's int8, for one."):
        nanopali.save(model, processor, tmp_path / "int8")
    assert not (tmp_path / "int8" / "model.safetensors").exists()


def test_int8_refuses_a_model_that_is_not_on_the_cpu():
    with torch.device("meta"):
        model = GemmaForCausalLM(GemmaConfig.tiny())
    with pytest.raises(ValueError, match="the model is on meta: int8 here uses PyTorch's CPU kernel"):
        quantize_int8(model)


# ---------------------------------------------------------------- exercises (their checks refuse wrong answers)


def _int8_linear(x, weight_int8, scale, bias=None):
    out = (x.float() @ weight_int8.float().T) * scale
    return (out if bias is None else out + bias).to(x.dtype)


def test_exercise_10_1_refuses_a_forgotten_scale_or_bias_and_a_float32_answer_to_bfloat16(capsys):
    from nanopali.exercises.lesson10 import check_int8_linear

    assert not check_int8_linear(lambda x, q, s, b=None: x @ q.float().T + (0 if b is None else b))
    assert not check_int8_linear(lambda x, q, s, b=None: _int8_linear(x, q, s))  # the bias left out
    assert "add the bias" in capsys.readouterr().out
    assert not check_int8_linear(lambda x, q, s, b=None: _int8_linear(x.float(), q, s, b))  # float32 out
    assert "Exercise 10.1: not right yet" in capsys.readouterr().out
    assert check_int8_linear(_int8_linear)


def _quantize_groups(weight, bits=4, group_size=32, top=None, transpose=False):
    top = top or 2 ** (bits - 1) - 1
    w = weight.T if transpose else weight
    out, width = w.shape
    groups = w.float().reshape(out, width // group_size, group_size)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / top
    q = torch.round(groups / scale[..., None]).clamp(-top - 1, top).to(torch.int8).reshape(out, width)
    if transpose:  # groups taken down the columns: the shapes come out right only for a square matrix
        return q.T.contiguous(), scale.reshape(weight.shape[0], -1)
    return q, scale


def test_exercise_10_2_refuses_the_asymmetric_range_and_one_scale_per_row(capsys):
    from nanopali.exercises.lesson10 import check_quantize_groups

    assert not check_quantize_groups(lambda w, bits=4, group_size=32: _quantize_groups(w, bits, group_size,
                                                                                        top=2 ** (bits - 1)))
    per_row = lambda w, bits=4, group_size=32: _quantize_groups(w, bits, w.shape[1])
    assert not check_quantize_groups(per_row)
    assert not check_quantize_groups(lambda w, bits=4, group_size=32: _quantize_groups(w, bits, group_size,
                                                                                        transpose=True))
    assert "Exercise 10.2: not right yet" in capsys.readouterr().out
    assert check_quantize_groups(_quantize_groups)


def test_exercise_10_2_names_the_value_q_reaches_with_its_sign(capsys):
    from nanopali.exercises.lesson10 import check_quantize_groups

    def clamped(weight, bits=4, group_size=32):  # scale = max / 8, then clamped to -8..7: -max becomes -8
        out, width = weight.shape
        groups = weight.float().reshape(out, width // group_size, group_size)
        scale = groups.abs().amax(dim=-1) / 2 ** (bits - 1)
        q = torch.round(groups / scale[..., None]).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return q.to(torch.int8).reshape(out, width), scale

    assert not check_quantize_groups(clamped)
    out = capsys.readouterr().out
    assert "q reaches -8" in out and "q reaches 8" not in out

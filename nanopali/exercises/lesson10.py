"""Checks for lesson 10's exercises (notebooks/10_int8.ipynb). Hand-written; solutions in
notebooks/solutions/10_int8.ipynb."""

import torch

from nanopali.quantize import quantize_rows

from . import exercise


@exercise("10.1")
def check_int8_linear(int8_linear) -> str:
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # 48 outputs, 64 inputs, rows of many sizes
    bias = torch.randn(48)
    q, scale = quantize_rows(weight)
    exact = (q.double() * scale.double()[:, None])  # the dequantized weight, (out, in)
    for bias_or_none in (None, bias):
        x = torch.randn(2, 5, 64)
        expected = x.double() @ exact.T + (0 if bias_or_none is None else bias.double())
        got = int8_linear(x, q, scale, bias_or_none)
        assert isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 5, 48), (
            f"shape {tuple(getattr(got, 'shape', ()))}, expected (2, 5, 48): x (..., in) -> (..., out)")
        assert got.dtype == torch.float32, f"a float32 input gave {got.dtype}: the output takes the input's type"
        size = expected.abs().max().item()
        error = (got.double() - expected).abs().max().item()
        if bias_or_none is not None and error > 1e-5 * size:
            missing = (got.double() + bias.double() - expected).abs().max().item()
            assert missing > 1e-5 * size, "the difference is exactly the bias: add the bias to the outputs"
        assert error <= 1e-5 * size, (
            f"{'with' if bias_or_none is not None else 'without'} a bias, float32: largest difference from "
            f"x @ (q * scale[:, None]).T {error:.3g} (outputs up to {size:.3g}): the scale is one per output row "
            "and multiplies the outputs")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = x.double() @ exact.T + bias.double()
    got = int8_linear(x, q, scale, bias)
    assert got.dtype == torch.bfloat16, f"a bfloat16 input gave {got.dtype}: the output takes the input's type"
    error = (got.double() - expected).abs().max().item()
    assert error <= 0.02 * expected.abs().max().item(), f"bfloat16: largest difference {error:.3g}, too far"
    return "float32 with and without a bias, and bfloat16, equal x @ (q * scale[:, None]).T + bias"


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    "(out, in) whole numbers and (out, in // group_size) scales -> the (out, in) weights they stand for."
    out, width = q.shape
    return (q.float().view(out, width // group_size, group_size) * scale[..., None]).view(out, width)


def _weights_with_outliers(generator: torch.Generator) -> torch.Tensor:
    "(64, 256) weights like a trained model's: rows of different sizes, and one weight in eight rows 20 times the rest."
    weight = torch.randn(64, 256, generator=generator) * torch.logspace(-2, 0, 64)[:, None]
    rows = torch.arange(0, 64, 8)
    columns = torch.randint(0, 256, (8,), generator=generator)
    weight[rows, columns] = 20 * weight[rows].std(dim=1)
    return weight


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    "||approx - weight|| / ||weight||, in float64 so that the printed digits are the same on every CPU."
    return ((approx.double() - weight.double()).norm() / weight.double().norm()).item()


@exercise("10.2")
def check_quantize_groups(quantize_groups) -> str:
    weight = _weights_with_outliers(torch.Generator().manual_seed(0))
    for bits, group_size in [(4, 32), (4, 64), (8, 32)]:
        top = 2 ** (bits - 1) - 1  # 7 for int4, 127 for int8
        q, scale = quantize_groups(weight, bits=bits, group_size=group_size)
        groups = 256 // group_size
        assert tuple(q.shape) == (64, 256), f"bits={bits}: q has shape {tuple(q.shape)}, expected (64, 256)"
        assert tuple(scale.shape) == (64, groups), (
            f"bits={bits}, group_size={group_size}: scale has shape {tuple(scale.shape)}, expected (64, {groups}): "
            "one scale per group of consecutive weights in a row")
        assert q.dtype == torch.int8, f"q is {q.dtype}: keep the whole numbers in an int8 tensor"
        assert scale.dtype == torch.float32, f"scale is {scale.dtype}, expected float32"
        extreme = int(q.flatten()[q.abs().argmax()])  # the value furthest from zero, with its sign
        assert abs(extreme) <= top, f"bits={bits}: q reaches {extreme}, but the symmetric range is -{top} to {top}"
        largest = q.view(64, groups, group_size).abs().amax(dim=-1)
        assert (largest == top).all(), (
            f"bits={bits}, group_size={group_size}: in {int((largest != top).sum())} of {64 * groups} groups the "
            f"largest |q| is not {top}: each group's scale is its own largest |weight| / {top}")
        error = (_dequantize_groups(q, scale, group_size) - weight).abs().view(64, groups, group_size)
        assert (error <= scale[..., None] / 2 * 1.001).all(), (
            f"bits={bits}: some weights are more than half a step from q * scale: round to the nearest whole number")
    q4, s4 = quantize_groups(weight, bits=4, group_size=32)
    q8, s8 = quantize_rows(weight)
    one_scale = weight.abs().amax(dim=1, keepdim=True) / 7  # int4 with one scale per row, for comparison
    per_row_int4 = torch.round(weight / one_scale) * one_scale
    errors = [_relative_error(weight, w) for w in
              (_dequantize_groups(q4, s4, 32), per_row_int4, q8.float() * s8[:, None])]
    return ("ranges, shapes and half-step rounding for int4 (groups of 32 and 64) and int8. Error on weights with "
            f"outliers: int4 per group of 32 {errors[0]:.1%}, int4 per row {errors[1]:.1%}, "
            f"int8 per row {errors[2]:.1%}")

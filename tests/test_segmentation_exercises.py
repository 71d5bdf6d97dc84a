"""Lesson 12's exercises: their checks accept a right answer and refuse the typical wrong ones, saying why.

The worked solutions (notebooks/solutions/12_segmentation.ipynb) run under nbval; here, answers written to be
wrong in one way each."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nanopali.exercises.lesson12 import check_codes_by_shape, check_paste_mask, check_vq_step

# ---------------------------------------------------------------- 12.1: the mask back into its crop


def _paste(mask64, box, height, width, *, threshold_first=False, swapped=False, as_float=False):
    "Right by default; each keyword makes one typical mistake."
    y0, x0, y1, x1 = box
    picture = Image.fromarray(np.asarray(mask64 > 0, np.uint8) * 255) if threshold_first else Image.fromarray(
        np.asarray(mask64, np.float32))
    size = (y1 - y0, x1 - x0) if swapped else (x1 - x0, y1 - y0)
    resized = np.asarray(picture.resize(size, Image.Resampling.BILINEAR))
    full = np.zeros((height, width), dtype=np.float32 if as_float else bool)
    if swapped and size[0] != size[1]:
        resized = resized.T  # the right shape, the wrong picture
    full[y0:y1, x0:x1] = (resized > (127 if threshold_first else 0))
    return full


def test_exercise_12_1_accepts_resize_then_threshold(capsys):
    assert check_paste_mask(_paste)
    assert capsys.readouterr().out.startswith("Exercise 12.1: correct: held-out shapes pasted back")


def test_exercise_12_1_refuses_a_float_array(capsys):
    assert not check_paste_mask(lambda *a: _paste(*a, as_float=True))
    assert "threshold the resized mask at 0" in capsys.readouterr().out


def test_exercise_12_1_refuses_thresholding_before_resizing_and_swapped_sizes(capsys):
    assert not check_paste_mask(lambda *a: _paste(*a, threshold_first=True))
    assert "pixel(s) differ from the expected mask" in capsys.readouterr().out
    assert not check_paste_mask(lambda *a: _paste(*a, swapped=True))
    assert "resize to (box width, box height), PIL's order" in capsys.readouterr().out


def test_exercise_12_1_refuses_a_mask_spilling_out_of_its_box(capsys):
    def spill(mask64, box, height, width):
        full = _paste(mask64, box, height, width)
        full[0, 0] = full[-1, -1] = True
        return full

    assert not check_paste_mask(spill)
    assert "set outside the box" in capsys.readouterr().out


# ---------------------------------------------------------------- 12.2: which codes mean what


def _codes_by_shape(vae, crops, shapes):
    with torch.no_grad():
        codes = vae.tokenize(crops)
    found = {}
    for row, shape in zip(codes.tolist(), shapes):
        found.setdefault(shape, set()).update(row)
    return found


def test_exercise_12_2_accepts_the_sets_and_names_the_inside_code(capsys):
    assert check_codes_by_shape(_codes_by_shape)
    assert "codes in use" in capsys.readouterr().out


def test_exercise_12_2_refuses_lists_and_first_codes_only(capsys):
    assert not check_codes_by_shape(lambda *a: {k: sorted(v) for k, v in _codes_by_shape(*a).items()})
    assert "make it a set of ints" in capsys.readouterr().out

    def first_code_only(vae, crops, shapes):
        with torch.no_grad():
            codes = vae.tokenize(crops)[:, 0]
        found = {}
        for code, shape in zip(codes.tolist(), shapes):
            found.setdefault(shape, set()).add(code)
        return found

    assert not check_codes_by_shape(first_code_only)
    assert "collect every code of its 16" in capsys.readouterr().out


# ---------------------------------------------------------------- 12.3: one VQ-VAE step, by hand


def _vq_step(z, codebook, beta, *, commitment_trains_codes=False, swapped_losses=False, plain_q=False):
    q = codebook[torch.cdist(z.detach(), codebook.detach()).argmin(1)]
    straight = q if plain_q else z + (q - z).detach()
    if swapped_losses:
        return straight, beta * F.mse_loss(q, z.detach()) + F.mse_loss(z, q.detach())
    return straight, F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q if commitment_trains_codes else q.detach())


def test_exercise_12_3_accepts_the_straight_through_step(capsys):
    assert check_vq_step(_vq_step)
    assert capsys.readouterr().out.startswith("Exercise 12.3: correct")


def test_exercise_12_3_refuses_the_typical_mistakes(capsys):
    assert not check_vq_step(lambda z, c, b: (z, _vq_step(z, c, b)[1]))  # no quantising at all
    assert "(it equals z: the codes are missing)" in capsys.readouterr().out
    assert not check_vq_step(lambda z, c, b: _vq_step(z, c, b, swapped_losses=True))
    assert "loss " in capsys.readouterr().out
    assert not check_vq_step(lambda z, c, b: _vq_step(z, c, b, plain_q=True))  # no gradient to z
    assert "z's gradient differs" in capsys.readouterr().out
    assert not check_vq_step(lambda z, c, b: _vq_step(z, c, b, commitment_trains_codes=True))
    assert "the codebook's gradient differs" in capsys.readouterr().out

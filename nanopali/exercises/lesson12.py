"""Checks for lesson 12's exercises (notebooks/12_segmentation.ipynb). Hand-written; solutions in
notebooks/solutions/12_segmentation.ipynb."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nanopali.segmentation import load_mask_decoder, mask_crop, mask_iou, scene_mask_crops
from nanopali.train import SHAPES, make_scene

from . import exercise

SHIPPED = Path(__file__).resolve().parent.parent.parent / "weights" / "nanopali-shapes"
HELD_OUT = 987_654_321  # lesson 08's EVAL_SEED


def _paste(mask64: np.ndarray, box: tuple, height: int, width: int) -> np.ndarray:
    y0, x0, y1, x1 = box
    full = np.zeros((height, width), dtype=bool)
    resized = Image.fromarray(np.asarray(mask64, dtype=np.float32)).resize((x1 - x0, y1 - y0),
                                                                           Image.Resampling.BILINEAR)
    full[y0:y1, x0:x1] = np.asarray(resized) > 0
    return full


@exercise("12.1")
def check_paste_mask(paste_mask) -> str:
    vae = load_mask_decoder(SHIPPED)
    crops, _ = scene_mask_crops(4, HELD_OUT)
    with torch.no_grad():
        decoded = vae.decode(vae.tokenize(torch.from_numpy(crops))).numpy()  # (N, 64, 64)
    rng = np.random.default_rng(0)
    for mask64 in np.concatenate([decoded] * 4)[:12]:
        height, width = (int(v) for v in rng.integers(20, 90, size=2))
        y0, x0 = int(rng.integers(0, height - 3)), int(rng.integers(0, width - 3))
        box = (y0, x0, int(rng.integers(y0 + 1, height + 1)), int(rng.integers(x0 + 1, width + 1)))
        got = paste_mask(mask64, box, height, width)
        assert isinstance(got, np.ndarray), f"paste_mask returned a {type(got).__name__}, expected a numpy array"
        assert got.shape == (height, width), f"box {box} in {height} x {width}: shape {got.shape}, expected " \
                                             f"{(height, width)} (height, width)"
        assert got.dtype == bool, f"dtype {got.dtype}: threshold the resized mask at 0 (> 0 is inside) for a bool array"
        outside = got.copy()
        outside[box[0]:box[2], box[1]:box[3]] = False
        assert not outside.any(), f"box {box}: {int(outside.sum())} pixel(s) set outside the box"
        expected = _paste(mask64, box, height, width)
        if not np.array_equal(got, expected):
            hint = ": resize to (box width, box height), PIL's order, with the bilinear filter, then threshold at 0"
            raise AssertionError(f"box {box} in {height} x {width}: {int((got != expected).sum())} pixel(s) differ "
                                 f"from the expected mask{hint}")
    # the whole path on held-out scenes: mask -> 16 codes -> 64 x 64 -> pasted into the box
    small, large = [], []
    for i in range(60):
        _, scene_objects, masks = make_scene(np.random.default_rng([HELD_OUT, i]), with_masks=True)
        batch = torch.from_numpy(np.stack([mask_crop(m, o.box) for o, m in zip(scene_objects, masks)]))
        with torch.no_grad():
            rebuilt = vae.decode(vae.tokenize(batch)).numpy()  # (objects, 64, 64)
        for o, m, mask64 in zip(scene_objects, masks, rebuilt):
            iou = mask_iou(paste_mask(mask64, o.box, *m.shape), m > 0)
            (small if o.box[2] - o.box[0] < 40 else large).append(iou)
    both = min(np.mean(small), np.mean(large))
    how = "above 99% for small and large shapes alike" if both > 0.99 else (
        f"of {np.mean(small):.0%} (under 40 px) and {np.mean(large):.0%} (larger)")
    return (f"held-out shapes pasted back into their own boxes match their masks at a mean IoU {how}: 64 x 64 holds "
            "more detail than these shapes have, so what costs IoU in 12.8 is the box, rounded to location tokens and "
            "to whole pixels")


@exercise("12.2")
def check_codes_by_shape(codes_by_shape) -> str:
    vae = load_mask_decoder(SHIPPED)
    crops, objects = scene_mask_crops(100, HELD_OUT)
    shapes = [o.shape for o in objects]
    batch = torch.from_numpy(crops)
    got = codes_by_shape(vae, batch, shapes)
    with torch.no_grad():
        codes = vae.tokenize(batch)
    expected = {s: {int(c) for row, t in zip(codes, shapes) if t == s for c in row} for s in SHAPES}
    assert isinstance(got, dict), f"got a {type(got).__name__}, expected a dict from shape name to a set of codes"
    assert set(got) == set(SHAPES), f"keys {sorted(got)}, expected the four shapes {sorted(SHAPES)}"
    for s in SHAPES:
        assert isinstance(got[s], set), f"got[{s!r}] is a {type(got[s]).__name__}: make it a set of ints"
        assert {int(c) for c in got[s]} == expected[s], (
            f"{s}: codes {sorted(got[s])[:8]}..., expected {sorted(expected[s])}: tokenise all of the shape's crops "
            "and collect every code of its 16")
    shared = set.intersection(*expected.values())
    square = codes[[i for i, t in enumerate(shapes) if t == "square"]]
    full = int(square[0, 5])  # a cell in the middle of a square's crop: all inside
    return (f"{len(set.union(*expected.values()))} codes in use; {len(shared)} shared by all four shapes, among them "
            f"{full}, the code of a cell inside the mask all over (the middle of a square's crop): a code stands "
            "for a patch of outline, not for a shape; the shape is in their arrangement")


@exercise("12.3")
def check_vq_step(vq_step) -> str:
    torch.manual_seed(0)
    for n, d, k, beta in ((16, 8, 10, 0.25), (5, 3, 7, 1.0)):
        z = torch.randn(n, d, requires_grad=True)
        codebook = torch.randn(k, d, requires_grad=True)
        weights = torch.randn(n, d)
        straight, loss = vq_step(z, codebook, beta)
        assert isinstance(straight, torch.Tensor) and straight.shape == (n, d), (
            f"straight has shape {tuple(getattr(straight, 'shape', ()))}, expected {(n, d)}")
        nearest = torch.cdist(z.detach(), codebook.detach()).argmin(1)
        q = codebook.detach()[nearest]
        assert torch.allclose(straight.detach(), q, atol=1e-6), (
            "forwards, straight must equal the nearest code of each vector" +
            (" (it equals z: the codes are missing)" if torch.allclose(straight.detach(), z.detach()) else ""))
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, "loss must be a single number (a 0-d tensor)"
        z_ref, book_ref = z.detach().clone().requires_grad_(), codebook.detach().clone().requires_grad_()
        q_ref = book_ref[nearest]
        loss_ref = F.mse_loss(q_ref, z_ref.detach()) + beta * F.mse_loss(z_ref, q_ref.detach())
        straight_ref = z_ref + (q_ref - z_ref).detach()
        assert torch.allclose(loss.detach(), loss_ref.detach(), atol=1e-6), (
            f"loss {loss.item():.5f}, expected {loss_ref.item():.5f}: the mean squared error between the codes and "
            "the vectors, plus beta times the same error (with the other side detached)")
        (loss + (straight * weights).sum()).backward()
        (loss_ref + (straight_ref * weights).sum()).backward()
        assert z.grad is not None and torch.allclose(z.grad, z_ref.grad, atol=1e-6), (
            "z's gradient differs: straight's gradient must reach z unchanged (z + (q - z).detach()), and only the "
            "commitment loss may add to it")
        assert codebook.grad is not None and torch.allclose(codebook.grad, book_ref.grad, atol=1e-6), (
            "the codebook's gradient differs: only the codebook loss may train it (detach z there, and keep "
            "straight's gradient off the codebook)")
    return "values and gradients equal vae_loss's straight-through path, for two sizes and two betas"

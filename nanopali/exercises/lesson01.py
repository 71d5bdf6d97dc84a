"""Checks for lesson 01's exercises (notebooks/01_patch_embeddings.ipynb). Hand-written; solutions in
notebooks/solutions/01_patch_embeddings.ipynb."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanopali.patches import patchify

from . import exercise

__all__ = ["check_unpatchify", "check_conv_weight_from_jax", "check_resize_position_embeddings"]


def _rearranged(images: torch.Tensor, p: int, order: tuple[int, ...]) -> torch.Tensor:
    "Square images with their (gh, P, gw, P) axes rearranged: what a wrong permute in unpatchify gives back."
    B, C, S, _ = images.shape
    g = S // p
    x = images.reshape(B, C, g, p, g, p).permute(0, 1, *(2 + i for i in order))  # (B, C, 4 axes reordered)
    return x.reshape(B, C, S, S)


def _unpatchify_mistake(back: torch.Tensor, images: torch.Tensor, patches: torch.Tensor, p: int) -> str:
    "Say what a wrong unpatchify did, when its output is a known rearrangement of the image."
    S = images.shape[-1]
    if torch.equal(back, patches.reshape(images.shape)):
        return ("your output is the patches reshaped straight to (B, 3, H, W): a plain reshape keeps memory order, "
                "so it lays out each patch's 3 * P * P numbers as strips of pixels, not as a square. Undo patchify's "
                "steps in reverse, permute included")
    if torch.equal(back, _rearranged(images, p, (2, 1, 0, 3))):
        return (f"your output is the image with its grid of patches transposed ({S}-pixel images, patches of {p}): "
                "the patch in grid row i, column j landed at row j, column i. The grid rows and columns "
                "(gh and gw) are swapped in your permute")
    if torch.equal(back, _rearranged(images, p, (0, 3, 2, 1))):
        return (f"every patch of your output is transposed ({S}-pixel images, patches of {p}): the patches are in "
                "the right places, but inside each one the pixel rows and columns (the two P axes) are swapped")
    if torch.equal(back, _rearranged(images, p, (2, 3, 0, 1))):
        return ("your output is the image transposed: rows and columns swapped both for the grid (gh, gw) and "
                "inside each patch (P, P)")
    return (f"unpatchify(patchify(x)) is not x ({S}-pixel images, patches of {p}): undo patchify's steps in "
            "reverse order, permute included")


@exercise("1.1")
def check_unpatchify(unpatchify) -> str:
    "unpatchify(patchify(x)) must give x back, exactly, for several image and patch sizes."
    torch.manual_seed(0)
    for batch, size, p in [(2, 28, 14), (1, 32, 8), (3, 42, 14)]:
        images = torch.randn(batch, 3, size, size)
        patches = patchify(images, p)
        back = unpatchify(patches.clone(), p, size)
        expected = (batch, 3, size, size)
        assert tuple(back.shape) == expected, f"shape {tuple(back.shape)} for {size}-pixel images, expected {expected}"
        assert torch.equal(back, images), _unpatchify_mistake(back, images, patches, p)
    return "unpatchify(patchify(x)) == x for 28, 32 and 42-pixel images, patches of 14 and 8"


def _jax_patch_embeddings(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """What a JAX convolution with a (P, P, C, D) kernel and stride P computes, written as a sum over each patch:
    out[b, i, j, d] = sum over (h, w, c) of image[b, c, i*P + h, j*P + w] * kernel[h, w, c, d]."""
    P = kernel.shape[0]
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, gh, P, gw, P)
    return torch.einsum("bcihjw,hwcd->bijd", x, kernel)  # (B, gh, gw, D)


@exercise("1.2")
def check_conv_weight_from_jax(conv_weight_from_jax) -> str:
    "The converted weight, used in a PyTorch Conv2d, must compute what the JAX kernel computes."
    torch.manual_seed(0)
    P, C, D = 4, 3, 5
    kernel = torch.randn(P, P, C, D)  # JAX layout: (height, width, in channels, out channels)
    images = torch.randn(2, C, 8, 12)  # a 2 x 3 grid of patches
    weight = conv_weight_from_jax(kernel)
    assert tuple(weight.shape) == (D, C, P, P), (
        f"weight shape {tuple(weight.shape)}, expected (D, C, P, P) = {(D, C, P, P)}")
    ours = F.conv2d(images, weight, stride=P).permute(0, 2, 3, 1)  # (B, gh, gw, D)
    expected = _jax_patch_embeddings(images, kernel)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), (
        "the Conv2d with your weight computes other embeddings than the JAX kernel: a reshape does not reorder "
        "axes, and height and width must not be swapped")
    return "Conv2d with the converted weight == the JAX convolution, on 2 images of 2 x 3 patches"


def _bicubic_reference(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    "The interpolation transformers' SiglipVisionEmbeddings.interpolate_pos_encoding does."
    N, D = weight.shape
    grid = round(N**0.5)
    x = weight.reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, grid, grid)
    x = F.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(new_grid * new_grid, D)


def _transposed_grid(weight: torch.Tensor) -> torch.Tensor:
    "The table with the grid's rows and columns swapped: patch (i, j) gets the vector of patch (j, i)."
    N, D = weight.shape
    grid = round(N**0.5)
    return weight.reshape(grid, grid, D).transpose(0, 1).reshape(N, D)


def _mixed_up(weight: torch.Tensor, new_grid: int) -> list[torch.Tensor]:
    """What comes out when the (grid * grid, D) table is reshaped straight to (1, D, grid, grid), with no permute,
    read back either way: each of the D "channels" then holds numbers of several patches' vectors."""
    N, D = weight.shape
    grid = round(N**0.5)
    x = F.interpolate(weight.reshape(1, D, grid, grid), size=(new_grid, new_grid), mode="bicubic",
                      align_corners=False)  # (1, D, new_grid, new_grid)
    return [x.reshape(new_grid * new_grid, D), x.permute(0, 2, 3, 1).reshape(new_grid * new_grid, D)]


_MIXED = ("features and positions get mixed up: reshaping the (grid * grid, D) table straight to (1, D, grid, grid) "
          "reads the numbers in memory order, so each channel holds pieces of several patches' vectors. Lay the "
          "table out as the grid first, (1, grid, grid, D), then move D to the channel axis")


def _same_grid_mistake(same: torch.Tensor, weight: torch.Tensor) -> str:
    "Say what went wrong when resizing to the same grid does not give the table back."
    if _close(same, _transposed_grid(weight)):
        return ("resizing to the same grid gave the table with the grid's rows and columns swapped (patch (i, j) "
                "got the vector of patch (j, i)): check the order of the grid axes in your permutes")
    if any(_close(same, m) for m in _mixed_up(weight, round(len(weight) ** 0.5))):
        return _MIXED
    return ("resizing to the same grid should give the table back unchanged: check the order of the reshapes "
            "and permutes (grid rows, grid columns, then the vector)")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@exercise("1.3")
def check_resize_position_embeddings(resize_position_embeddings) -> str:
    "Bicubic resize of the (grid x grid) table of position vectors, in patchify's row-by-row order."
    torch.manual_seed(0)
    grid, D = 4, 6
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    weight = torch.randn(grid * grid, D)
    weight[:, 0], weight[:, 1] = rows.float(), cols.float()  # two features that say where the patch is
    weight_before = weight.clone()
    same = resize_position_embeddings(weight, grid)
    assert tuple(same.shape) == (grid * grid, D), (
        f"shape {tuple(same.shape)} for the same grid, expected {(grid * grid, D)}")
    assert _close(same, weight), _same_grid_mistake(same, weight)
    big = resize_position_embeddings(weight, 7)
    assert torch.equal(weight, weight_before), "your function changed its input in place"
    assert tuple(big.shape) == (49, D), f"shape {tuple(big.shape)} for a 7 x 7 grid, expected (49, {D})"
    expected = _bicubic_reference(weight, 7)
    assert not any(_close(big, m) for m in _mixed_up(weight, 7)), _MIXED
    row_feature = big[:, 0].reshape(7, 7)  # (new rows, new columns) if the patches are numbered row by row
    assert row_feature.diff(dim=1).abs().max() < 1e-5 and row_feature.diff(dim=0).abs().max() > 0.1, (
        "feature 0 (the old row number) should change down the rows of the new grid and stay the same along "
        "them: check the order of the reshapes and permutes (grid rows, grid columns, then the vector)")
    assert _close(big, expected), (
        "not the bicubic interpolation of the grid: use F.interpolate(..., mode='bicubic', align_corners=False) "
        "on a (1, D, grid, grid) tensor")
    return "a 4 x 4 grid of 6-vectors to 7 x 7, equal to bicubic interpolation of the grid (align_corners=False)"

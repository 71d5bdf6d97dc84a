"""Checks for lesson 04's exercises (notebooks/04_rope.ipynb). Hand-written; solutions in
notebooks/solutions/04_rope.ipynb."""

from __future__ import annotations

import torch

from nanopali.rope import GemmaRotaryEmbedding, apply_rope, rope_inverse_frequencies

from . import exercise

__all__ = ["check_rope_interleaved", "check_rope_complex", "check_rope_matrix"]


def _half_split(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    "The lesson's RoPE (half-split pairs) of x (B, heads, L, d) at position_ids (B, L)."
    cos, sin = GemmaRotaryEmbedding(x.shape[-1], theta)(x, position_ids)
    return apply_rope(x, x, cos, sin)[0]


def _interleave(d: int) -> torch.Tensor:
    "Indices [0, d/2, 1, d/2 + 1, ...]: x[..., _interleave(d)] puts half-split pair i at dimensions (2i, 2i + 1)."
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return tuple(a.shape) == tuple(b.shape) and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


@exercise("4.1")
def check_rope_interleaved(rope_interleaved) -> str:
    "Neighbour pairs (2i, 2i + 1): the half-split rotation with the dimensions permuted; scores depend on distance."
    torch.manual_seed(0)
    d = 16
    x = torch.randn(2, 3, 5, d)  # (B, heads, L, d)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 30, 31, 32, 100]])
    got = rope_interleaved(x.clone(), positions)
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(x.shape), \
        f"expected a tensor of x's shape {tuple(x.shape)}"
    assert _close(got.norm(dim=-1), x.norm(dim=-1), 1e-4), "a rotation keeps every vector's length; yours does not"
    perm = _interleave(d)
    want = _half_split(x[..., perm.argsort()], positions)[..., perm]  # the same rotation, neighbours paired
    if not _close(got, want, 1e-4):
        assert not _close(got, _half_split(x, positions), 1e-4), \
            "you rotated the half-split pairs (i, i + d/2): pair neighbours, (2i, 2i + 1)"
        assert not _close(got, _half_split(x[..., perm.argsort()], -positions)[..., perm], 1e-4), \
            "you rotate the wrong way: x'[2i] = x[2i] cos - x[2i+1] sin, x'[2i+1] = x[2i+1] cos + x[2i] sin"
        raise AssertionError("pair i = (x[2i], x[2i+1]) must turn by position * omega_i, omega_i = "
                             "rope_inverse_frequencies(d)[i]; check the speeds and the sin/cos signs")
    q, k = torch.randn(2, 1, 1, 1, d)

    def score(m: int, n: int) -> float:
        return (rope_interleaved(q, torch.tensor([[m]])) * rope_interleaved(k, torch.tensor([[n]]))).sum().item()

    assert all(abs(score(9 + s, 4 + s) - score(9, 4)) < 1e-3 for s in (1, 50, 400)), \
        "shifting both positions changed the score"
    return "equal to half-split RoPE with the dimensions interleaved; scores unchanged by shifts of 1, 50, 400"


@exercise("4.2")
def check_rope_complex(rope_complex) -> str:
    "Half-split RoPE as one complex multiplication per pair."
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 32)  # (B, heads, L, d)
    positions = torch.arange(6)[None].expand(2, 6) + torch.tensor([[0], [40]])
    got = rope_complex(x.clone(), positions)
    assert isinstance(got, torch.Tensor) and not got.is_complex() and tuple(got.shape) == tuple(x.shape), \
        f"return a real tensor of x's shape {tuple(x.shape)}: turn the complex numbers back into two halves"
    want = _half_split(x, positions)
    if not _close(got, want, 1e-4):
        assert not _close(got, _half_split(x, -positions), 1e-4), \
            "you rotate the wrong way: multiply by exp(+i * angle) = cos + i sin, not by its conjugate"
        perm = _interleave(32)
        assert not _close(got, _half_split(x[..., perm.argsort()], positions)[..., perm], 1e-4), \
            "you paired neighbours (2i, 2i + 1): this is the half-split layout, pair i = (x[i], x[i + d/2])"
        raise AssertionError("not equal to apply_rope: pair i is the complex number x[i] + 1j * x[i + d/2], "
                             "multiplied by exp(1j * position * omega_i)")
    return "equal to apply_rope (to 1e-4) for 2 x 4 heads x 6 positions, head_dim 32"


@exercise("4.3")
def check_rope_matrix(rope_matrix) -> str:
    "RoPE as a (d, d) rotation matrix R(m): R(m) x = rope(x), orthogonal, and R(m)^T R(n) = R(n - m)."
    torch.manual_seed(0)
    d, m, n = 16, 7, 3
    R = rope_matrix(m, d)
    assert isinstance(R, torch.Tensor) and tuple(R.shape) == (d, d), f"expected a ({d}, {d}) tensor"
    x = torch.randn(d)
    want = _half_split(x[None, None, None], torch.tensor([[m]]))[0, 0, 0]
    assert not _close(R.float().T @ x, want, 1e-4), \
        "your R(m) turns the wrong way (it is the transpose): the -sin belongs at row i, column i + d/2"
    assert _close(R.float() @ x, want, 1e-4), \
        "R(m) @ x is not the lesson's RoPE of x at position m: row i mixes x[i] and x[i + d/2] (half-split pairs)"
    assert _close(R.float().T @ R.float(), torch.eye(d), 1e-4), "R(m) is not orthogonal: R^T R should be the identity"
    relative = rope_matrix(m, d).float().T @ rope_matrix(n, d).float()
    assert _close(relative, rope_matrix(n - m, d).float(), 1e-4), "R(m)^T R(n) should equal R(n - m)"
    omegas = rope_inverse_frequencies(d)
    assert _close(torch.diagonal(R.float())[: d // 2], torch.cos(m * omegas), 1e-4), "the diagonal holds cos(m omega_i)"
    return "R(7) x equals apply_rope, R is orthogonal, and R(7)^T R(3) = R(-4): the score sees only n - m"

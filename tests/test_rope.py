"""Lesson 04 against the reference: transformers' GemmaRotaryEmbedding and apply_rotary_pos_emb."""

import pytest
import torch

from nanopali.rope import GemmaRotaryEmbedding, apply_rope, rope_inverse_frequencies, rotate_half

transformers = pytest.importorskip("transformers")
from transformers.models.gemma import modeling_gemma  # noqa: E402


def reference_rope(head_dim, theta=10000.0):
    config = transformers.GemmaConfig(head_dim=head_dim, hidden_size=head_dim * 2, num_attention_heads=2,
                                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    return modeling_gemma.GemmaRotaryEmbedding(config)


@pytest.mark.parametrize("head_dim, theta", [(256, 10000.0), (16, 10000.0), (8, 500.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_equal_reference(head_dim, theta, dtype):
    positions = torch.tensor([[0, 1, 2, 3, 500, 1001, 8191], [5, 6, 7, 8, 9, 10, 11]])
    x = torch.zeros(1, dtype=dtype)
    cos, sin = GemmaRotaryEmbedding(head_dim, theta)(x, positions)
    ref_cos, ref_sin = reference_rope(head_dim, theta)(x, positions)
    assert cos.dtype == dtype and cos.shape == (2, 7, head_dim)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_queries_and_keys_equal_reference(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 8, 5, 256, dtype=dtype)  # 8 query heads
    k = torch.randn(2, 1, 5, 256, dtype=dtype)  # 1 key/value head
    positions = torch.arange(5)[None].expand(2, 5) + torch.tensor([[0], [300]])
    cos, sin = GemmaRotaryEmbedding(256)(q, positions)
    ours_q, ours_k = apply_rope(q, k, cos, sin)
    ref_q, ref_k = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(ours_q, ref_q) and torch.equal(ours_k, ref_k)
    assert torch.equal(rotate_half(q), modeling_gemma.rotate_half(q))


def test_inverse_frequencies_are_one_over_theta_to_the_2i_over_d():
    omegas = rope_inverse_frequencies(256)
    expected = torch.tensor([10000.0 ** (-2 * i / 256) for i in range(128)])
    torch.testing.assert_close(omegas, expected, rtol=1e-6, atol=0)
    assert omegas.dtype == torch.float32


def test_scores_depend_only_on_the_distance():
    torch.manual_seed(0)
    rope = GemmaRotaryEmbedding(64)
    q, k = torch.randn(2, 1, 1, 1, 64)

    def score(m, n):
        q_rot, _ = apply_rope(q, q, *rope(q, torch.tensor([[m]])))
        _, k_rot = apply_rope(k, k, *rope(k, torch.tensor([[n]])))
        return (q_rot * k_rot).sum()

    for shift in (1, 17, 400):
        torch.testing.assert_close(score(10 + shift, 4 + shift), score(10, 4), atol=1e-4, rtol=0)
    assert abs(score(10, 4) - score(11, 4)) > 1e-2


def test_rotation_keeps_lengths():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 32)
    cos, sin = GemmaRotaryEmbedding(32)(x, torch.arange(6)[None] * 37)
    rotated, _ = apply_rope(x, x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)


# Exercises: each check accepts a right answer and refuses plausible wrong ones.

def _interleaved(sign=1.0, speeds=rope_inverse_frequencies):
    def rope_interleaved(x, position_ids, theta=10000.0):
        angles = sign * (position_ids[..., None].float() * speeds(x.shape[-1], theta))[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], -1).flatten(-2)
    return rope_interleaved


def test_exercise_rope_interleaved_check(capsys):
    from nanopali.exercises.lesson04 import check_rope_interleaved

    def half_split(x, position_ids, theta=10000.0):  # the lesson's layout, not the exercise's
        return apply_rope(x, x, *GemmaRotaryEmbedding(x.shape[-1], theta)(x, position_ids))[0]

    assert not check_rope_interleaved(half_split)
    assert "half-split" in capsys.readouterr().out
    assert not check_rope_interleaved(_interleaved(sign=-1.0))
    assert "wrong way" in capsys.readouterr().out
    assert not check_rope_interleaved(_interleaved(speeds=lambda d, theta: torch.ones(d // 2)))
    assert check_rope_interleaved(_interleaved())


def test_exercise_rope_complex_check(capsys):
    from nanopali.exercises.lesson04 import check_rope_complex

    def complex_rope(conjugate):
        def rope_complex(x, position_ids, theta=10000.0):
            x1, x2 = x.chunk(2, dim=-1)
            angles = (position_ids[..., None].float() * rope_inverse_frequencies(x.shape[-1], theta))[:, None]
            turn = torch.polar(torch.ones_like(angles), -angles if conjugate else angles)
            turned = torch.complex(x1, x2) * turn
            return torch.cat([turned.real, turned.imag], dim=-1)
        return rope_complex

    assert not check_rope_complex(complex_rope(conjugate=True))
    assert "wrong way" in capsys.readouterr().out
    assert not check_rope_complex(lambda x, p, theta=10000.0: x)
    assert check_rope_complex(complex_rope(conjugate=False))


def test_exercise_rope_matrix_check(capsys):
    from nanopali.exercises.lesson04 import check_rope_matrix

    def matrix(neighbours):
        def rope_matrix(position, head_dim, theta=10000.0):
            angles = position * rope_inverse_frequencies(head_dim, theta)
            R = torch.zeros(head_dim, head_dim)
            for i, (c, s) in enumerate(zip(angles.cos(), angles.sin())):
                a, b = (2 * i, 2 * i + 1) if neighbours else (i, i + head_dim // 2)
                R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
            return R
        return rope_matrix

    assert not check_rope_matrix(matrix(neighbours=True))
    assert "half-split" in capsys.readouterr().out
    assert not check_rope_matrix(lambda position, head_dim, theta=10000.0: torch.eye(head_dim))
    capsys.readouterr()
    assert not check_rope_matrix(lambda position, head_dim, theta=10000.0: matrix(False)(position, head_dim).T)
    assert "wrong way" in capsys.readouterr().out
    assert check_rope_matrix(matrix(neighbours=False))

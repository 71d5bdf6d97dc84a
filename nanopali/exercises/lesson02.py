"""Checks for lesson 02's exercises (notebooks/02_siglip_encoder.ipynb). Hand-written; solutions in
notebooks/solutions/02_siglip_encoder.ipynb."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nanopali.siglip import eager_attention

from . import exercise

__all__ = ["check_same_column_head", "check_attention_loops", "check_sigmoid_loss"]


@exercise("2.1")
def check_same_column_head(same_column_head) -> str:
    "Each patch must put (almost) all its attention on its own column of the grid, spread evenly over it."
    for grid in (16, 5):
        N = grid * grid
        q, k = same_column_head(grid)
        assert q.ndim == 2 and q.shape[0] == N and tuple(k.shape) == tuple(q.shape), (
            f"for a {grid} x {grid} grid, queries and keys should both be (N, d) with N = {N}, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}")
        _, weights = eager_attention(q.float(), k.float(), torch.zeros(N, 1), scale=1.0)  # (N, N)
        col = torch.arange(N) % grid  # patches are numbered row by row: patch i is in column i % grid
        same = col[:, None] == col[None, :]  # (N, N): True where key j is in query i's column
        on_column = (weights * same).sum(-1)  # (N,)
        worst = on_column.argmin().item()
        assert on_column.min() >= 0.99, (
            f"{grid} x {grid} grid: patch {worst} (column {worst % grid}) puts only {on_column[worst]:.2f} of its "
            "attention on its own column (want >= 0.99): is the score higher for the same column, and sharp enough?")
        own = weights[same].reshape(N, grid)  # each query's weights on the grid patches of its column
        spread = (own.max(-1).values / own.min(-1).values).max()
        assert spread <= 1.05, (
            f"{grid} x {grid} grid: the weights inside a column are not even (largest / smallest = {spread:.3g}): "
            "every patch of the column should score the same, whatever its row")
    return "on 16 x 16 and 5 x 5 grids, each patch puts >= 0.99 of its attention on its own column, evenly"


@exercise("2.2")
def check_attention_loops(attention_loops) -> str:
    "Loops over queries and keys must give eager_attention's output, also when the scores are large."
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 4), torch.randn(7, 4), torch.randn(7, 3)
    out = torch.as_tensor(attention_loops(q, k, v), dtype=torch.float32)
    expected, _ = eager_attention(q, k, v)
    assert tuple(out.shape) == (5, 3), f"output shape {tuple(out.shape)}, expected (5, 3) = (queries, value width)"
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), (
        "not softmax(q k^T / sqrt(d)) v: check the 1 / sqrt(d) scale and that each query's weights "
        "(over the keys) sum to 1")
    out = torch.as_tensor(attention_loops(40 * q, 40 * k, v), dtype=torch.float32)  # scores up to several hundred
    expected, _ = eager_attention(40 * q, 40 * k, v)
    assert torch.isfinite(out).all(), (
        "with large scores your output holds inf or nan: exp overflows above about 88 in float32. Subtract "
        "each query's largest score before exp (the softmax does not change)")
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), "right for small scores, wrong for large ones"
    return "equal to eager_attention on 5 queries, 7 keys, also with scores in the hundreds"


def _loss_another_way(image_embeds, text_embeds, t_prime, b):
    "The same loss as binary cross-entropy with 0/1 labels: -log sigmoid(-z) = -log(1 - sigmoid(z))."
    x, y = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = x @ y.T * math.exp(t_prime) + b  # (n, n)
    targets = torch.eye(len(x))
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(x)


def _loss_variant(x, y, t_prime, b, normalise=True, temperature=math.exp, sign=1.0, per_pair=False) -> float:
    "SigLIP's loss with one of the usual mistakes switched on (all off: the right loss)."
    if normalise:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    n = len(x)
    z = temperature(t_prime) * x @ y.T + b  # (n, n)
    labels = sign * (2 * torch.eye(n) - 1)
    return (-F.logsigmoid(labels * z).sum() / (n * n if per_pair else n)).item()


_MISTAKES = {  # what a mistake does to the loss -> what to tell the learner
    "per_pair": "your loss is the sum divided by n * n (a mean over the matrix): divide the sum over all n * n "
                "pairs by n, the number of pairs in the batch",
    "temperature": "your loss is what t = t' gives: t' is the logarithm of the temperature, use t = exp(t')",
    "normalise": "your loss is what unnormalised embeddings give: scale each row to length 1 first (F.normalize)",
    "sign": "your loss is what flipped labels give: +1 on the diagonal (the true pairs), -1 elsewhere, and the "
            "loss is -log sigmoid(label * z)",
}


def _loss_mistake(got: float, images, texts, t_prime, b) -> str | None:
    "The message for the first usual mistake whose loss on this batch is `got`, if any."
    variants = {"per_pair": dict(per_pair=True), "temperature": dict(temperature=lambda t: t),
                "normalise": dict(normalise=False), "sign": dict(sign=-1.0)}
    for name, mistake in variants.items():
        wrong = _loss_variant(images, texts, t_prime, b, **mistake)
        if abs(got - wrong) <= 1e-5 * max(1.0, abs(wrong)):
            return _MISTAKES[name]
    return None


@exercise("2.3")
def check_sigmoid_loss(sigmoid_loss) -> str:
    "SigLIP's loss, on a batch small enough to do by hand and on a random one."
    # two pairs, each image pointing exactly where its text points (lengths differ: normalise first)
    images = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    texts = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    # with t = 10, b = -10: matching pairs score 10 - 10 = 0, the others 0 - 10 = -10, so the loss is
    # -(1/2) (2 log sigmoid(0) + 2 log sigmoid(10)) = log 2 + log(1 + e^-10)
    expected = math.log(2) + math.log1p(math.exp(-10))
    got = float(sigmoid_loss(images.clone(), texts.clone(), math.log(10), -10.0))
    where = f"on the two-pair batch done by hand (t' = log 10, b = -10) the loss is {expected:.5f}, yours {got:.5f}"
    assert abs(got - expected) < 1e-5, (
        f"{where}: " + (_loss_mistake(got, images, texts, math.log(10), -10.0) or
                        "normalise the embeddings, t = exp(t'), sum over all n * n pairs and divide by n (not n * n)"))
    torch.manual_seed(0)
    images, texts = torch.randn(4, 8), torch.randn(4, 8)
    expected = _loss_another_way(images, texts, 0.5, -2.0).item()
    got = float(sigmoid_loss(images.clone(), texts.clone(), 0.5, -2.0))
    where = f"on a random batch of 4 pairs (t' = 0.5, b = -2) the loss is {expected:.5f}, yours {got:.5f}"
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (
        where + (f": {mistake}" if (mistake := _loss_mistake(got, images, texts, 0.5, -2.0)) else ""))
    return "log 2 + log(1 + e^-10) on the two-pair batch; equal to binary cross-entropy on a random batch of 4"

"""Lesson 02 against the reference: transformers' SiglipVisionModel without pooling head.

float32: equal to 1e-5 on two tiny configurations, on both of our attention paths
(explicit and SDPA) against both of the reference's (eager and sdpa).

bfloat16 tolerance: bfloat16 keeps 8 significant bits, so one rounding step is
2**-8 (0.4%) of a value. We run the same operations in the same order and dtype as
the reference (scores in the model dtype, softmax in float32), so today the outputs
are bit-identical; a different BLAS or SDPA kernel may order sums differently, so
we allow two rounding steps at the size of the largest output value, and require
our error against float32 to be no larger than the reference's own bfloat16 error
(plus 25%)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanopali.exercises.lesson02 import check_attention_loops, check_same_column_head, check_sigmoid_loss
from nanopali.patches import SiglipVisionConfig, preprocess_images
from nanopali.siglip import SiglipAttention, SiglipVisionModel, eager_attention

from conftest import IMAGES

transformers = pytest.importorskip("transformers")
from transformers.models.siglip import modeling_siglip  # noqa: E402

ATOL = 1e-5
CONFIGS = {
    "56px width 32, 4 heads, 2 layers": SiglipVisionConfig.tiny(),
    "64px patch 8, width 48, 6 heads, 3 layers": SiglipVisionConfig.tiny(
        image_size=64, patch_size=8, hidden_size=48, num_attention_heads=6, num_hidden_layers=3,
        intermediate_size=96),
}


def reference_model(cfg: SiglipVisionConfig, attn_implementation: str):
    ref_cfg = transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, vision_use_head=False,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return modeling_siglip.SiglipVisionModel(ref_cfg).eval()


def twin(cfg, attn_implementation="eager"):
    "The reference model and ours, holding the same random weights."
    ref = reference_model(cfg, attn_implementation)
    # make the biases and LayerNorm weights non-trivial, so that a bug there would show
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = SiglipVisionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def pixels(cfg):
    return preprocess_images([IMAGES / "astronaut.jpg", IMAGES / "chelsea.png", IMAGES / "coffee.jpg"],
                             size=cfg.image_size)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("reference_path", ["eager", "sdpa"])
@pytest.mark.parametrize("our_path", ["explicit", "sdpa"])
def test_tower_equals_reference_in_float32(name, reference_path, our_path):
    cfg = CONFIGS[name]
    ref, ours = twin(cfg, reference_path)
    x = pixels(cfg)
    with torch.no_grad():
        expected = ref(x).last_hidden_state
        got = ours(x, return_attention=True)[0] if our_path == "explicit" else ours(x)
    assert got.shape == (3, cfg.num_patches, cfg.hidden_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_weights_equal_reference(name):
    cfg = CONFIGS[name]
    ref, ours = twin(cfg, "eager")
    x = pixels(cfg)
    with torch.no_grad():
        expected = ref(x, output_attentions=True).attentions
        _, got = ours(x, return_attention=True)
    assert len(got) == len(expected) == cfg.num_hidden_layers
    for layer, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == (3, cfg.num_attention_heads, cfg.num_patches, cfg.num_patches)
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0, msg=f"layer {layer}")
        torch.testing.assert_close(g.sum(-1), torch.ones_like(g.sum(-1)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("our_path", ["explicit", "sdpa"])
def test_tower_close_to_reference_in_bfloat16(name, our_path):
    cfg = CONFIGS[name]
    ref, ours = twin(cfg, "eager" if our_path == "explicit" else "sdpa")
    x = pixels(cfg)
    with torch.no_grad():
        truth = ref(x).last_hidden_state  # float32
        ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        expected = ref16(x.bfloat16()).last_hidden_state
        got = ours16(x.bfloat16(), return_attention=True)[0] if our_path == "explicit" else ours16(x.bfloat16())
    assert got.dtype == torch.bfloat16
    step = 2.0**-8 * truth.abs().max().item()  # one bfloat16 rounding step at the largest value
    torch.testing.assert_close(got.float(), expected.float(), atol=2 * step, rtol=0)
    our_error = (got.float() - truth).abs().max().item()
    reference_error = (expected.float() - truth).abs().max().item()
    assert our_error <= 1.25 * reference_error + 1e-3


def test_the_two_attention_paths_agree_on_a_layer():
    torch.manual_seed(0)
    cfg = SiglipVisionConfig.tiny()
    attn = SiglipAttention(cfg).eval()
    x = torch.randn(2, 16, cfg.hidden_size)
    with torch.no_grad():
        explicit, weights = attn(x, return_attention=True)
        fast, none = attn(x)
    assert none is None and weights.shape == (2, cfg.num_attention_heads, 16, 16)
    torch.testing.assert_close(fast, explicit, atol=ATOL, rtol=0)


def test_eager_attention_matches_torch_sdpa_with_a_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 5, 8).unbind(0)
    mask = torch.rand(5, 5) > 0.4
    mask.fill_diagonal_(True)  # every query sees at least itself
    out, weights = eager_attention(q, k, v, mask=mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert torch.all(weights[..., ~mask] == 0)


def test_eager_attention_softmax_runs_in_float32():
    "Scores in bfloat16 then softmax in float32, as the reference does: rows still sum to 1 closely."
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 4, 300, 16).bfloat16().unbind(0)
    out, weights = eager_attention(q, k, v)
    assert out.dtype == weights.dtype == torch.bfloat16
    assert (weights.float().sum(-1) - 1).abs().max() < 2e-2


def test_real_tower_parameter_count_and_shapes():
    with torch.device("meta"):
        tower = SiglipVisionModel(SiglipVisionConfig.so400m())
        features = tower(torch.empty(2, 3, 224, 224))
    assert sum(p.numel() for p in tower.parameters()) == 412_442_352
    assert features.shape == (2, 256, 1152)
    assert len(tower.encoder.layers) == 27


def test_real_tower_state_dict_matches_reference_names_and_shapes():
    cfg = SiglipVisionConfig.so400m()
    ref_cfg = transformers.SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=224, vision_use_head=False)
    with torch.device("meta"):
        ref = modeling_siglip.SiglipVisionModel(ref_cfg)
        ours = SiglipVisionModel(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act .relu. is not supported"):
        SiglipVisionModel(SiglipVisionConfig.tiny(hidden_act="relu"))


# Exercises (lesson 02, ## Exercises): each check accepts a right answer and refuses plausible wrong ones.


def _one_hot_head(grid, sharpness=10.0, of=lambda i, g: i % g):
    keys = F.one_hot(of(torch.arange(grid * grid), grid), grid).float()
    return sharpness * keys, keys


def test_exercise_same_column_head_check(capsys):
    assert check_same_column_head(_one_hot_head)
    assert not check_same_column_head(lambda g: _one_hot_head(g, of=lambda i, g: i // g))  # same row
    assert not check_same_column_head(lambda g: _one_hot_head(g, sharpness=2.0))  # too soft
    assert not check_same_column_head(lambda g: (50 * torch.eye(g * g), torch.eye(g * g)))  # only itself
    assert "not right yet" in capsys.readouterr().out


def _loops(q, k, v, stable=True, scale=True):
    out = torch.zeros(len(q), v.shape[1])
    for i in range(len(q)):
        s = torch.stack([q[i] @ k[j] for j in range(len(k))]) / (math.sqrt(q.shape[1]) if scale else 1.0)
        e = torch.exp(s - s.max()) if stable else torch.exp(s)
        for j in range(len(k)):
            out[i] += e[j] / e.sum() * v[j]
    return out


def test_exercise_attention_loops_check(capsys):
    assert check_attention_loops(_loops)
    assert not check_attention_loops(lambda q, k, v: _loops(q, k, v, stable=False))  # overflows
    assert not check_attention_loops(lambda q, k, v: _loops(q, k, v, scale=False))  # no 1 / sqrt(d)
    # weights normalised over the queries instead of over the keys
    assert not check_attention_loops(lambda q, k, v: (q @ k.T / 2).softmax(dim=0) @ v)
    assert "not right yet" in capsys.readouterr().out


def _sigmoid_loss(x, y, t_prime, b, normalise=True, temperature=math.exp, per=lambda n: n,
                  labels=lambda n: 2 * torch.eye(n) - 1):
    if normalise:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    z = temperature(t_prime) * x @ y.T + b
    return -F.logsigmoid(labels(len(x)) * z).sum() / per(len(x))


def test_exercise_sigmoid_loss_check(capsys):
    assert check_sigmoid_loss(_sigmoid_loss)
    # each usual mistake is recognised from the loss it gives, and named
    wrong = {
        "F.normalize": lambda *a: _sigmoid_loss(*a, normalise=False),
        "use t = exp(t')": lambda *a: _sigmoid_loss(*a, temperature=lambda t: t),  # t' used as t
        "divided by n * n": lambda *a: _sigmoid_loss(*a, per=lambda n: n * n),  # mean over n * n pairs
        "flipped labels": lambda *a: _sigmoid_loss(*a, labels=lambda n: 1 - 2 * torch.eye(n)),
        "sum over all n * n pairs and divide by n": lambda *a: -_sigmoid_loss(*a),  # none of these: the checklist
    }
    capsys.readouterr()
    for diagnosis, answer in wrong.items():
        assert not check_sigmoid_loss(answer)
        out = capsys.readouterr().out
        assert "not right yet" in out and diagnosis in out, (diagnosis, out)
    # the random batch names the mistake too: t' used as t only for t' = 0.5 there (right on the two-pair batch)
    assert not check_sigmoid_loss(lambda x, y, tp, b: _sigmoid_loss(x, y, tp, b, temperature=lambda t: t)
                                  if tp == 0.5 else _sigmoid_loss(x, y, tp, b))
    assert "use t = exp(t')" in capsys.readouterr().out

    def clip_loss(x, y, t_prime, b):  # CLIP's softmax loss: another loss, not SigLIP's
        z = math.exp(t_prime) * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
        target = torch.arange(len(x))
        return (F.cross_entropy(z, target) + F.cross_entropy(z.T, target)) / 2

    assert not check_sigmoid_loss(clip_loss)
    assert "not right yet" in capsys.readouterr().out

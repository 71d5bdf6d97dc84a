"""Lesson 01 against the reference implementation, Hugging Face transformers.

Pixel values must equal SiglipImageProcessor's PIL path, embeddings must equal
SiglipVisionEmbeddings with the same weights, float32, atol 1e-5."""

import numpy as np
import pytest
import torch
from PIL import Image

from nanopali.exercises.lesson01 import (
    check_conv_weight_from_jax,
    check_resize_position_embeddings,
    check_unpatchify,
)
from nanopali.patches import (
    SiglipVisionConfig,
    SiglipVisionEmbeddings,
    patchify,
    preprocess_image,
    preprocess_images,
    to_rgb,
)

from conftest import IMAGES

transformers = pytest.importorskip("transformers")
from transformers.models.siglip import modeling_siglip  # noqa: E402

ATOL = 1e-5


def reference_processor(size: int):
    "PaliGemma's preprocessing in transformers: SigLIP's processor, PIL backend, mean = std = 0.5."
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the PIL path is the plain class
        from transformers import SiglipImageProcessor as Processor
    return Processor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": size, "width": size},
                     resample=Image.Resampling.BICUBIC, do_convert_rgb=True)


def reference_pixels(images, size: int) -> torch.Tensor:
    return reference_processor(size)(images=images, return_tensors="pt")["pixel_values"]


def odd_images() -> dict[str, Image.Image]:
    "Grayscale, palette, transparent and oddly sized images made from a photo."
    rng = np.random.default_rng(0)
    photo = Image.open(IMAGES / "chelsea.png").convert("RGB")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (photo.height, photo.width), dtype=np.uint8)))
    palette_transparent = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette_transparent.info["transparency"] = 0
    return {
        "L": photo.convert("L"),
        "P": photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "P with transparency": palette_transparent,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "CMYK": photo.convert("CMYK"),
        "tiny 5x3": photo.resize((5, 3)),
        "tall 31x500": photo.resize((31, 500)),
    }


@pytest.mark.parametrize("size", [224, 448])
def test_pixel_values_equal_reference_on_every_photo(photos, size):
    ours = preprocess_images(photos, size=size)
    ref = reference_pixels([Image.open(p) for p in photos], size)
    assert ours.shape == ref.shape == (len(photos), 3, size, size)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", list(odd_images()))
def test_pixel_values_equal_reference_for_other_modes_and_shapes(mode):
    image = odd_images()[mode]
    ours = preprocess_image(image, size=56)
    ref = reference_pixels([image], 56)[0]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_pixel_values_lie_in_minus_one_to_one(photos):
    x = preprocess_images(photos)
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.99 and x.max() > 0.99  # the photos use the whole range


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # black, fully transparent
    assert np.asarray(to_rgb(clear)).min() == 255
    assert torch.all(preprocess_image(clear, size=14) == 1.0)


def test_a_16_bit_photo_gives_the_pixels_of_its_8_bit_original(tmp_path):
    "The reference converts a 16-bit image with Pillow, which clips it to white; we scale it to 8 bits first."
    gray = Image.open(IMAGES / "chelsea.png").convert("L")
    deep = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # v -> v * 257: 255 -> 65535
    deep.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    expected = preprocess_image(gray, size=56)
    for image in [deep, tmp_path / "deep.png", Image.open(tmp_path / "deep.png")]:
        assert torch.equal(preprocess_image(image, size=56), expected)
    clipped = reference_pixels([deep], 56)[0]
    assert (clipped > 0.99).float().mean() > 0.9  # what Pillow's convert alone gives: nearly all white


def test_patchify_is_the_strided_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    x = torch.randn(2, 3, 42, 28)
    by_conv = conv(x).flatten(2).transpose(1, 2)
    by_linear = patchify(x, 14) @ conv.weight.reshape(8, -1).T + conv.bias
    assert by_linear.shape == (2, 3 * 2, 8)
    torch.testing.assert_close(by_linear, by_conv, atol=ATOL, rtol=0)


def test_patchify_refuses_sizes_that_are_not_multiples():
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        patchify(torch.zeros(1, 3, 30, 28), 14)


TINY_CONFIGS = {
    "56px patch 14 width 32": SiglipVisionConfig.tiny(),
    "64px patch 8 width 48": SiglipVisionConfig.tiny(image_size=64, patch_size=8, hidden_size=48,
                                                     num_attention_heads=6),
}


def reference_config(cfg: SiglipVisionConfig):
    return transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
    )


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_embeddings_equal_reference_with_the_same_weights(name, photos):
    cfg = TINY_CONFIGS[name]
    torch.manual_seed(0)
    ref = modeling_siglip.SiglipVisionEmbeddings(reference_config(cfg)).eval()
    ours = SiglipVisionEmbeddings(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes
    pixels = preprocess_images(photos[:3], size=cfg.image_size)
    with torch.no_grad():
        expected, got = ref(pixels), ours(pixels)
    assert got.shape == (3, cfg.num_patches, cfg.hidden_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_parameter_names_and_shapes_match_reference():
    cfg = SiglipVisionConfig.so400m()
    with torch.device("meta"):
        ref = modeling_siglip.SiglipVisionEmbeddings(reference_config(cfg))
        ours = SiglipVisionEmbeddings(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_defaults_are_the_reference_defaults():
    "A checkpoint's terse config.json leaves out fields equal to the reference class defaults."
    ref = transformers.SiglipVisionConfig()
    ours = SiglipVisionConfig()
    for field in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_channels", "image_size", "patch_size", "layer_norm_eps", "hidden_act"]:
        assert getattr(ours, field) == getattr(ref, field), field


def test_real_model_shapes_and_token_counts():
    cfg = SiglipVisionConfig.so400m()
    with torch.device("meta"):
        embed = SiglipVisionEmbeddings(cfg)
        out = embed(torch.empty(1, 3, 224, 224))
    assert out.shape == (1, 256, 1152)
    assert sum(p.numel() for p in embed.parameters()) == 3 * 14 * 14 * 1152 + 1152 + 256 * 1152
    assert [SiglipVisionConfig.so400m(s).num_patches for s in (224, 448, 896)] == [256, 1024, 4096]


def test_embeddings_refuse_wrong_pixel_shape_with_advice():
    embed = SiglipVisionEmbeddings(SiglipVisionConfig.tiny())
    with pytest.raises(ValueError, match=r"got \(1, 3, 224, 224\): preprocess images with size=56"):
        embed(torch.zeros(1, 3, 224, 224))


def test_config_refuses_inconsistent_sizes():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        SiglipVisionConfig(image_size=100, patch_size=14)
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        SiglipVisionConfig(hidden_size=30, num_attention_heads=4)


# Exercises (lesson 01, ## Exercises): each check accepts a right answer and refuses plausible wrong ones.


def _unpatchify(patches, patch_size, image_size, order=(0, 3, 1, 4, 2, 5)):
    g = image_size // patch_size
    x = patches.reshape(patches.shape[0], g, g, 3, patch_size, patch_size).permute(*order)
    return x.reshape(patches.shape[0], 3, image_size, image_size)


def test_exercise_unpatchify_check(capsys):
    assert check_unpatchify(_unpatchify)
    # each plausible mistake gets its own diagnosis
    wrong = {
        "plain reshape": lambda p, P, S: p.reshape(p.shape[0], 3, S, S),  # no permute: memory order
        "(gh and gw) are swapped": lambda p, P, S: _unpatchify(p, P, S, order=(0, 3, 2, 4, 1, 5)),  # grid transposed
        "inside each one the pixel rows and columns": lambda p, P, S: _unpatchify(p, P, S, order=(0, 3, 1, 5, 2, 4)),
        "the image transposed": lambda p, P, S: _unpatchify(p, P, S, order=(0, 3, 2, 5, 1, 4)),
        "undo patchify's steps": lambda p, P, S: _unpatchify(p, P, S).flip(-1),  # none of the above
    }
    capsys.readouterr()
    for diagnosis, answer in wrong.items():
        assert not check_unpatchify(answer)
        out = capsys.readouterr().out
        assert "not right yet" in out and diagnosis in out, (diagnosis, out)


def test_exercise_conv_weight_from_jax_check(capsys):
    assert check_conv_weight_from_jax(lambda k: k.permute(3, 2, 0, 1))
    assert not check_conv_weight_from_jax(lambda k: k.reshape(k.shape[3], k.shape[2], k.shape[0], k.shape[1]))
    assert not check_conv_weight_from_jax(lambda k: k.permute(3, 2, 1, 0))  # height and width swapped
    assert "not right yet" in capsys.readouterr().out


def _resize(weight, new_grid, perm=(0, 3, 1, 2), **kwargs):
    N, D = weight.shape
    g = round(N**0.5)
    x = weight.reshape(1, g, g, D).permute(*perm)
    x = torch.nn.functional.interpolate(x, size=(new_grid, new_grid), **{"mode": "bicubic", "align_corners": False,
                                                                         **kwargs})
    return x.permute(0, 2, 3, 1).reshape(new_grid * new_grid, D)


def test_exercise_resize_position_embeddings_check(capsys):
    assert check_resize_position_embeddings(_resize)
    F = torch.nn.functional

    def straight_to_channels(w, g, read_back_with_permute):  # (N, D) reshaped to (1, D, grid, grid), no permute
        x = F.interpolate(w.reshape(1, w.shape[1], 4, 4), size=(g, g), mode="bicubic")
        return (x.permute(0, 2, 3, 1) if read_back_with_permute else x).reshape(g * g, w.shape[1])

    wrong = {
        "rows and columns swapped": lambda w, g: _resize(w, g, perm=(0, 3, 2, 1)),  # grid transposed
        "features and positions get mixed up": lambda w, g: straight_to_channels(w, g, True),
        "features and positions get mixed": lambda w, g: straight_to_channels(w, g, False),
        "align_corners=False": lambda w, g: _resize(w, g, align_corners=True),
        "mode='bicubic'": lambda w, g: _resize(w, g, mode="bilinear"),
    }
    capsys.readouterr()
    for diagnosis, answer in wrong.items():
        assert not check_resize_position_embeddings(answer)
        out = capsys.readouterr().out
        assert "not right yet" in out and diagnosis in out, (diagnosis, out)

"""Lesson 09's helpers: boxes read from <loc> answers and drawn, attention maps of a generation and their figures."""

import numpy as np
import pytest
import torch
from PIL import Image

import nanopali
from nanopali.train import make_scene
from nanopali.visualize import (
    BOX_COLOURS,
    Answer,
    Detection,
    draw_attention,
    draw_boxes,
    generate_with_attention,
    overlay,
    parse_boxes,
)

from conftest import IMAGES, SHIPPED


@pytest.fixture(scope="module")
def shipped():
    return nanopali.load(SHIPPED, dtype="float32")


@pytest.fixture(scope="module")
def scene():
    return make_scene(np.random.default_rng([2026, 945]), 112)  # images/scene.png


def test_the_demo_scene_is_lesson_09s_scene_945(scene):
    with Image.open(IMAGES / "scene.png") as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(scene[0]))


# ---------------------------------------------------------------- boxes


def test_one_box_in_pixels_y_first():
    found, problems = parse_boxes("<loc0000><loc0256><loc0511><loc1023> cat", width=1023, height=2046)
    assert problems == []
    assert [d.label for d in found] == ["cat"]
    y0, x0, y1, x1 = found[0].box
    assert (y0, x0, x1) == (0.0, 256.0, 1023.0)  # the first code is y (of the height), the second x (of the width)
    assert y1 == pytest.approx(511 / 1023 * 2046)


def test_the_reference_answer_on_a_non_square_photo():
    "REFERENCE.md: 'detect shoe' -> '<loc0051><loc0309><loc0708><loc0646> shoe'; fractions of height and width."
    found, problems = parse_boxes("<loc0051><loc0309><loc0708><loc0646> shoe", width=640, height=480)
    assert problems == [] and [d.label for d in found] == ["shoe"]
    assert found[0].box == pytest.approx((51 / 1023 * 480, 309 / 1023 * 640, 708 / 1023 * 480, 646 / 1023 * 640))


def test_several_objects_joined_by_semicolons():
    text = "<loc0010><loc0020><loc0030><loc0040> red circle ; <loc0100><loc0200><loc0300><loc0400> star ; "
    found, problems = parse_boxes(text, 1023, 1023)
    assert problems == []
    assert [d.label for d in found] == ["red circle", "star"]
    assert [d.box for d in found] == [(10.0, 20.0, 30.0, 40.0), (100.0, 200.0, 300.0, 400.0)]


@pytest.mark.parametrize("text, says", [
    ("<loc0100><loc0200><loc0300> circle", "found 3 location token(s)"),
    ("a cat on a sofa", "found 0 location token(s)"),
    ("<loc0100><loc0200><loc0300><loc0400><loc0500> circle", "found 5 location token(s)"),
    ("<loc0500><loc0100><loc0200><loc0900> star", "ends before it starts"),
    ("<loc0001><loc0002><loc0003><loc0004>", "no label"),
    ("<loc0001><loc0002><loc0003><loc1500> dog", "from 0 to 1023"),
    ("<loc01><loc0002><loc0003><loc0004> dog", "found 3 location token(s)"),
])
def test_malformed_parts_are_reported_not_crashed_on(text, says):
    found, problems = parse_boxes(text, 100, 100)
    assert found == []
    assert len(problems) == 1 and says in problems[0] and text.strip() in problems[0]


def test_a_bad_part_does_not_hide_the_good_ones():
    found, problems = parse_boxes("<loc0000><loc0000><loc0512><loc0512> cat ; dog ; <loc0001><loc0002>", 10, 10)
    assert [d.label for d in found] == ["cat"]
    assert len(problems) == 2


def test_an_empty_answer_is_reported():
    assert parse_boxes(" ", 10, 10) == ([], ["the answer is empty: there is no box to read"])


def test_segmentation_codes_after_a_box_are_skipped():
    text = "<loc0100><loc0200><loc0300><loc0400>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat"
    found, problems = parse_boxes(text, 1023, 1023)
    assert problems == [] and found == [Detection("cat", (100.0, 200.0, 300.0, 400.0))]


def test_boxes_are_drawn_where_they_belong():
    image = Image.new("RGB", (112, 56), "white")
    drawn = draw_boxes(image, [Detection("thing", (20.0, 30.0, 50.0, 90.0))])
    assert drawn.size == (896, 448)  # enlarged 8x: the short side reaches 448
    assert image.getpixel((0, 0)) == (255, 255, 255)  # the input is untouched
    red = tuple(int(BOX_COLOURS[0][i:i + 2], 16) for i in (1, 3, 5))
    assert drawn.getpixel((30 * 8, 45 * 8)) == red  # left edge of the box
    assert drawn.getpixel((90 * 8 - 1, 45 * 8)) == red  # right edge
    assert drawn.getpixel((60 * 8, 35 * 8)) == (255, 255, 255)  # inside, away from the label: untouched


def test_large_photos_are_not_resized(tmp_path):
    photo = Image.open(IMAGES / "astronaut.jpg")  # 512 x 512: large enough already
    drawn = draw_boxes(photo, parse_boxes("<loc0100><loc0100><loc0900><loc0900> face", *photo.size)[0])
    assert drawn.size == photo.size
    drawn.save(tmp_path / "boxes.png")
    assert Image.open(tmp_path / "boxes.png").size == photo.size


@pytest.mark.parametrize("size", [(8000, 1), (1, 8000)])
def test_a_thin_image_is_drawn_on_without_being_enlarged_into_gigabytes(size, tmp_path):
    "Enlarged until its short side is 448 pixels, an 8000 x 1 image would be 3,584,000 x 448: over 4 GB."
    image = Image.new("RGB", size, "white")
    drawn = draw_boxes(image, parse_boxes("<loc0000><loc0000><loc1023><loc1023> line", *size)[0])
    assert drawn.size == size  # its long side is already past max_side: no enlargement at all
    assert drawn.tobytes() != image.tobytes()  # the box is drawn all the same
    answer = Answer("red", ["\u2581red", "<eos>"], [5, 1], [], torch.rand(2, 4, 4, 8, 8))
    draw_attention(image, answer, path=tmp_path / "map.png")
    with Image.open(tmp_path / "map.png") as png:
        assert png.width <= 2048 and png.height <= 2048


def test_enlargement_stops_at_max_side():
    drawn = draw_boxes(Image.new("RGB", (100, 1), "white"), [])  # 448 times would make it 44,800 pixels wide
    assert drawn.size == (2000, 20)  # the largest whole number of times that keeps the long side within 2048
    assert draw_boxes(Image.new("RGB", (100, 1), "white"), [], max_side=4000).size == (4000, 40)
    assert draw_boxes(Image.new("RGB", (112, 112), "white"), []).size == (448, 448)  # scenes: as before


# ---------------------------------------------------------------- attention maps


def test_generation_with_attention_answers_as_generate(shipped, scene):
    model, processor = shipped
    image, _ = scene
    for prompt in ["caption en", "answer en what color is the star?", "detect star ; circle"]:
        answer = generate_with_attention(model, processor, image, prompt)
        assert answer.text == nanopali.generate(model, processor, [image], [prompt])[0]
        assert answer.tokens[-1] == "<eos>" and len(answer.tokens) == len(answer.token_ids)


def test_attention_maps_have_the_grid_shape_and_sum_as_they_should(shipped, scene):
    model, processor = shipped
    image, _ = scene
    answer = generate_with_attention(model, processor, image, "caption en")
    n, layers, heads, grid = len(answer.tokens), 4, 4, 8
    assert answer.image_attention.shape == (n, layers, heads, grid, grid)
    prompt_length = processor(image, "caption en")["input_ids"].shape[1]
    for j, row in enumerate(answer.rows):
        assert row.shape == (layers, heads, prompt_length + j)
        torch.testing.assert_close(row.sum(-1), torch.ones(layers, heads), atol=1e-5, rtol=0)
        # the image's slots are the first 64 tokens of the prompt, patch by patch, row by row
        torch.testing.assert_close(answer.image_attention[j].flatten(-2), row[..., :64], atol=0, rtol=0)
    share = answer.image_share()
    assert share.shape == (n, layers, heads) and (share > 0).all() and (share <= 1 + 1e-6).all()


def test_attention_maps_equal_a_separate_full_forward_pass(shipped, scene):
    "Taken during generation, they are the attention a plain forward pass over prompt + answer computes."
    model, processor = shipped
    image, _ = scene
    answer = generate_with_attention(model, processor, image, "answer en what shape is the red one?")
    inputs = processor(image, "answer en what shape is the red one?")
    L = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer.token_ids])], dim=1)
    types = torch.cat([inputs["token_type_ids"], torch.ones(1, len(answer.token_ids), dtype=torch.long)], dim=1)
    with torch.no_grad():
        _, weights = model(ids, inputs["pixel_values"], torch.ones_like(ids), types, return_attention=True)
    for j, row in enumerate(answer.rows):
        expected = torch.stack([w[0, :, L - 1 + j, : L + j] for w in weights]).float()
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


def test_a_non_square_photo_and_a_bigger_grid(tmp_path):
    "A random model at 224 pixels (a 16 x 16 grid) on a 451 x 300 photo: maps on the grid, figure written."
    from nanopali.bridge import PaliGemmaProcessor, build_tokenizer
    from nanopali.decoder import GemmaConfig
    from nanopali.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from nanopali.patches import SiglipVisionConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer(["a cat", "caption en"], vocab_size=300)
    config = PaliGemmaConfig(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=224, patch_size=14),
                             GemmaConfig.tiny(vocab_size=tokenizer.get_vocab_size()),
                             image_token_index=tokenizer.token_to_id("<image>"))
    model = PaliGemmaForConditionalGeneration(config).eval()
    processor = PaliGemmaProcessor(tokenizer, num_image_tokens=256, image_size=(224, 224))
    answer = generate_with_attention(model, processor, IMAGES / "chelsea.png", "caption en", max_new_tokens=3)
    assert answer.image_attention.shape[-2:] == (16, 16)
    fig = draw_attention(IMAGES / "chelsea.png", answer, layer=1, head=0, path=tmp_path / "map.png")
    with Image.open(tmp_path / "map.png") as png:
        png.verify()
        assert png.format == "PNG"
    words = len([t for t in answer.tokens if t != "<eos>"])
    panels = 1 + words + (words > 1)  # the image, each token but <eos>, their mean
    assert len([ax for ax in fig.axes if ax.images]) == panels


def test_draw_attention_writes_a_png_and_refuses_layers_that_do_not_exist(shipped, scene, tmp_path):
    model, processor = shipped
    image, _ = scene
    answer = generate_with_attention(model, processor, image, "caption en")
    draw_attention(image, answer, max_tokens=3, path=tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as png:
        png.verify()
        assert png.format == "PNG"
    with pytest.raises(ValueError, match="layer 4 does not exist: the model has 4 layers"):
        draw_attention(image, answer, layer=4)
    with pytest.raises(ValueError, match="head -1 does not exist"):
        draw_attention(image, answer, head=-1)


def test_overlay_stretches_the_grid_over_the_whole_photo():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    overlay(ax, IMAGES / "chelsea.png", torch.rand(16, 16), "a map")
    image_layer, map_layer = ax.images
    assert image_layer.get_extent() == map_layer.get_extent() == [0, 451, 300, 0]


# ---------------------------------------------------------------- exercises (their checks refuse wrong answers)


def _box_to_locs(box, width, height, first="y", divide=1023):
    y0, x0, y1, x1 = box
    pairs = [(y0, height), (x0, width), (y1, height), (x1, width)]
    if first == "x":
        pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
    return "".join(f"<loc{round(v / side * divide):04d}>" for v, side in pairs)


def test_exercise_9_1_refuses_boxes_read_x_first_or_over_1024(capsys):
    from nanopali.exercises.lesson09 import check_box_to_locs

    assert not check_box_to_locs(lambda b, w, h: _box_to_locs(b, w, h, first="x"))
    assert not check_box_to_locs(lambda b, w, h: _box_to_locs(b, w, h, divide=1024))
    assert not check_box_to_locs(lambda b, w, h: _box_to_locs(b, h, w))  # width and height swapped
    assert "Exercise 9.1: not right yet" in capsys.readouterr().out
    assert check_box_to_locs(_box_to_locs)


def _share_in_box(grid_map, box, width, height, transpose=False, normalise=True, strict=False):
    grid = grid_map.shape[-1]
    ys = (torch.arange(grid) + 0.5) * height / grid
    xs = (torch.arange(grid) + 0.5) * width / grid
    if strict:  # edges left out
        inside = ((ys > box[0]) & (ys < box[2]))[:, None] & ((xs > box[1]) & (xs < box[3]))[None, :]
    else:
        inside = ((ys >= box[0]) & (ys <= box[2]))[:, None] & ((xs >= box[1]) & (xs <= box[3]))[None, :]
    inside = inside.T if transpose else inside
    total = grid_map.sum() if normalise else 1
    return ((grid_map * inside).sum() / total).item()


def test_exercise_9_2_refuses_a_transposed_grid_and_a_share_not_divided_by_the_total(capsys):
    from nanopali.exercises.lesson09 import check_share_in_box

    assert not check_share_in_box(lambda *a: _share_in_box(*a, transpose=True))
    assert not check_share_in_box(lambda *a: _share_in_box(*a, normalise=False))
    assert "divide by the map's total" in capsys.readouterr().out
    assert not check_share_in_box(lambda *a: _share_in_box(*a, strict=True))
    assert "a centre on the edge counts as inside" in capsys.readouterr().out
    assert not check_share_in_box(lambda m, b, w, h: _share_in_box(m, b, h, w))  # width and height swapped
    out = capsys.readouterr().out
    assert "y is a fraction of the height, x of the width" in out and "divide by the map's total" not in out
    assert not check_share_in_box(lambda *a: _share_in_box(*a, transpose=True))
    assert "Exercise 9.2: not right yet" in capsys.readouterr().out
    assert check_share_in_box(_share_in_box)

"""Checks for lesson 09's exercises (notebooks/09_end_to_end.ipynb). Hand-written; solutions in
notebooks/solutions/09_end_to_end.ipynb."""

import re

import torch

from nanopali.visualize import parse_boxes

from . import exercise

# (box (y_min, x_min, y_max, x_max) in pixels, width, height, its four codes), by hand: round(coord / side * 1023)
_KNOWN = [
    ((51 / 1023 * 480, 309 / 1023 * 640, 708 / 1023 * 480, 646 / 1023 * 640), 640, 480,
     "<loc0051><loc0309><loc0708><loc0646>"),  # the reference answer 'detect shoe' on a 640 x 480 photo
    ((0, 0, 300, 451), 451, 300, "<loc0000><loc0000><loc1023><loc1023>"),  # the whole image
    ((30, 100, 150, 200), 400, 300, "<loc0102><loc0256><loc0512><loc0512>"),  # 30/300 = 0.1 of the height
]


@exercise("9.1")
def check_box_to_locs(box_to_locs) -> str:
    for box, width, height, codes in _KNOWN:
        got = box_to_locs(box, width, height)
        assert isinstance(got, str), f"box_to_locs returned a {type(got).__name__}, expected a string of four tokens"
        assert re.fullmatch(r"(<loc\d{4}>){4}", got), (
            f"{got!r} is not four tokens <locNNNN> (four digits each, zero-padded: <loc0051>)")
        assert got == codes, (f"box {tuple(round(v, 1) for v in box)} on a {width} x {height} image gave {got}, "
                              f"expected {codes}: y first, y of the height, x of the width, round(coord / side * 1023)")
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # random boxes on images of random shapes: parse_boxes reads them back within half a code
        width, height = (int(v) for v in torch.randint(20, 2000, (2,), generator=generator))
        y = sorted((torch.rand(2, generator=generator) * height).tolist())
        x = sorted((torch.rand(2, generator=generator) * width).tolist())
        box = (y[0], x[0], y[1], x[1])
        found, problems = parse_boxes(box_to_locs(box, width, height) + " thing", width, height)
        assert not problems and len(found) == 1, f"parse_boxes could not read your answer back: {problems}"
        sides = (height, width, height, width)
        for got, want, side in zip(found[0].box, box, sides):
            assert abs(got - want) <= side / 1023 / 2 + 1e-6 * side, (
                f"box {tuple(round(v, 1) for v in box)} on a {width} x {height} image came back as "
                f"{tuple(round(v, 1) for v in found[0].box)}: more than half a code away")
    return "three boxes worked by hand, and 200 random boxes on images of random shapes read back within half a code"


def _share_in_box(grid_map: torch.Tensor, box, width: int, height: int) -> float:
    "The reference answer of exercise 9.2: the fraction of the map on the cells whose centre lies in the box."
    grid = grid_map.shape[-1]
    centres_y = (torch.arange(grid, dtype=torch.float64) + 0.5) * height / grid
    centres_x = (torch.arange(grid, dtype=torch.float64) + 0.5) * width / grid
    inside_y = (centres_y >= box[0]) & (centres_y <= box[2])
    inside_x = (centres_x >= box[1]) & (centres_x <= box[3])
    inside = inside_y[:, None] & inside_x[None, :]  # (grid, grid): row r is y, column c is x
    values = grid_map.double()
    return (values * inside).sum().item() / values.sum().item()


def _why_not(grid_map, box, width, height, got: float) -> str:
    "What a wrong share most likely got wrong, for the check's message."
    if abs(got - _share_in_box(grid_map, box, height, width)) < 1e-5:
        return "width and height swapped: y is a fraction of the height, x of the width"
    if abs(got - _share_in_box(grid_map, box, width, height) * grid_map.double().sum().item()) < 1e-5:
        return "divide by the map's total"
    return ("rows of the map are y (of the height), columns x (of the width); a cell counts when its centre is in "
            "the box")


@exercise("9.2")
def check_share_in_box(share_in_box) -> str:
    generator = torch.Generator().manual_seed(0)
    cases = [(8, 640, 480), (8, 300, 451), (16, 224, 224), (4, 1000, 250)]
    for grid, width, height in cases:
        grid_map = torch.rand(grid, grid, generator=generator) ** 4  # uneven, like attention; does not sum to 1
        box = (0, 0, height, width)
        whole = float(share_in_box(grid_map, box, width, height))
        assert abs(whole - 1) < 1e-5, (f"a box over the whole {width} x {height} image holds {whole:.4f} of the map, "
                                       f"expected 1: {_why_not(grid_map, box, width, height, whole)}")
        for _ in range(6):
            y = sorted((torch.rand(2, generator=generator) * height).tolist())
            x = sorted((torch.rand(2, generator=generator) * width).tolist())
            box = (y[0], x[0], y[1], x[1])
            got, want = float(share_in_box(grid_map, box, width, height)), _share_in_box(grid_map, box, width, height)
            assert abs(got - want) < 1e-5, (
                f"{grid} x {grid} map on a {width} x {height} image, box {tuple(round(v) for v in box)}: "
                f"got {got:.4f}, expected {want:.4f}: {_why_not(grid_map, box, width, height, got)}")
    # an 8 x 8 map on 640 x 480: cell centres at y = 30, 90, ..., x = 40, 120, ...; this box's edges lie on them
    grid_map, box = torch.rand(8, 8, generator=generator) ** 4, (90, 120, 270, 360)
    got, want = float(share_in_box(grid_map, box, 640, 480)), _share_in_box(grid_map, box, 640, 480)
    assert abs(got - want) < 1e-5, (
        f"box {box} on a 640 x 480 image, its edges exactly on cell centres: got {got:.4f}, expected {want:.4f}: "
        "a centre on the edge counts as inside (<= and >=, not < and >)")
    return (f"{len(cases)} maps on images of four shapes, 6 random boxes each and the whole image, and a box whose "
            "edges lie on cell centres")

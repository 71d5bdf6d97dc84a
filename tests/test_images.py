"""Bad input: each gives one clear error naming the file and the problem."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from nanopali.patches import ImageFileError, load_image, preprocess_image, to_8bit, to_rgb

from conftest import IMAGES, run_python


@pytest.fixture
def truncated_jpeg(tmp_path):
    data = (IMAGES / "astronaut.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])  # a download cut off halfway
    return path


@pytest.fixture
def not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is text, whatever the file name says\n")
    return path


def test_every_shipped_photo_loads(photos):
    assert len(photos) >= 4
    for path in photos:
        image = load_image(path)
        assert image.width > 0 and image.height > 0
        assert path.stat().st_size < 300 * 1024


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "no_such_photo.jpg"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such file"):
        load_image(missing)


def test_text_file_is_not_an_image(not_an_image):
    with pytest.raises(ImageFileError, match=f"{not_an_image}: not an image file"):
        load_image(not_an_image)


def test_truncated_file_is_reported_as_truncated(truncated_jpeg):
    with pytest.raises(ImageFileError, match=f"{truncated_jpeg}: the image file is truncated or damaged"):
        load_image(truncated_jpeg)


def test_truncated_png_is_reported_too(tmp_path):
    data = (IMAGES / "chelsea.png").read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFileError, match="truncated or damaged"):
        load_image(path)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageFileError, match="is a folder"):
        load_image(tmp_path)


def test_preprocess_goes_through_the_same_checks(truncated_jpeg):
    with pytest.raises(ImageFileError, match="truncated"):
        preprocess_image(truncated_jpeg)


def test_preprocess_refuses_other_types_with_advice():
    import numpy as np

    with pytest.raises(TypeError, match=r"got ndarray\. For a numpy array use PIL.Image.fromarray"):
        preprocess_image(np.zeros((8, 8, 3), dtype=np.uint8))


def test_image_file_error_is_a_value_error():
    "Callers that catch ValueError keep working."
    assert issubclass(ImageFileError, ValueError)


@pytest.mark.parametrize("case", ["missing", "text", "truncated"])
def test_command_line_gives_one_line_and_exit_1(case, tmp_path, truncated_jpeg, not_an_image):
    path = {"missing": tmp_path / "nope.jpg", "text": not_an_image, "truncated": truncated_jpeg}[case]
    result = run_python("-m", "nanopali", "--image", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nanopali: error: {path}: ")


def test_rgba_and_grayscale_files_work(tmp_path):
    Image.open(IMAGES / "chelsea.png").convert("LA").save(tmp_path / "gray_alpha.png")
    x = preprocess_image(tmp_path / "gray_alpha.png", size=28)
    assert x.shape == (3, 28, 28)


def test_a_photo_with_an_orientation_tag_is_turned_upright(tmp_path):
    "A phone's portrait photo: landscape pixels plus EXIF Orientation 6 (turn 90 degrees clockwise to view)."
    import numpy as np
    from transformers.image_utils import load_image as reference_load_image

    photo = Image.open(IMAGES / "coffee.jpg").convert("RGB")
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    ours, theirs = load_image(tmp_path / "phone.jpg"), reference_load_image(str(tmp_path / "phone.jpg"))
    assert ours.size == theirs.size == (photo.height, photo.width)
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs.convert("RGB")))


# High bit depth: Pillow's convert clips 16-bit values at 255 (a white image); load_image and to_rgb scale them.

def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    "A PNG file written byte by byte (zlib), so that the test does not depend on what Pillow can write."
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows))  # filter byte 0 (none) before each row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


MID_GREY = 32768  # 16-bit mid-grey: 32768 / 257 = 127.5, rounded to 128


@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)], ids=["gray", "RGB", "LA", "RGBA"])
def test_16_bit_pngs_stay_mid_grey_from_a_path_and_as_a_pil_image(tmp_path, colour_type, channels):
    import numpy as np

    values = np.full((3, 4, channels), MID_GREY, dtype=">u2")
    if channels in (2, 4):
        values[..., -1] = 65535  # opaque
    path = tmp_path / "grey16.png"
    path.write_bytes(png_bytes(4, 3, 16, colour_type, [row.tobytes() for row in values]))
    expected = preprocess_image(Image.new("L", (4, 3), 128), size=8)  # the 8-bit mid-grey
    for image in [path, Image.open(path), load_image(path)]:
        assert np.asarray(to_rgb(image if isinstance(image, Image.Image) else load_image(image))).max() == 128
        assert torch.equal(preprocess_image(image, size=8), expected)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_pil_images_are_scaled_by_257_and_rounded(mode):
    import numpy as np

    image = Image.new(mode, (4, 1))
    image.putdata([0, 257, MID_GREY, 65535])
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(to_8bit(image)).tolist() == [[0, 1, 128, 255]]


def test_mode_I_read_from_a_png_is_taken_as_16_bits(tmp_path):
    "Older Pillow versions open a 16-bit grayscale PNG in mode I: a PNG holds at most 16 bits."
    import numpy as np

    image = Image.new("I;16", (2, 1))
    image.putdata([MID_GREY, 65535])
    as_i = image.convert("I")
    assert np.asarray(to_8bit(as_i, file_format="PNG")).tolist() == [[128, 255]]


def test_mode_I_of_unknown_range_and_mode_F_are_refused_with_advice(tmp_path):
    import numpy as np

    for dtype, mode, words in [(np.int32, "I", r"32-bit integers \(mode 'I'\) of unknown range"),
                               (np.float32, "F", r"32-bit floats \(mode 'F'\), which have no fixed range")]:
        image = Image.fromarray(np.full((3, 4), 1000, dtype=dtype))
        assert image.mode == mode
        with pytest.raises(ValueError, match=words + ".*0..255"):
            preprocess_image(image)
        image.save(tmp_path / f"{mode}.tif")
        with pytest.raises(ImageFileError, match=f"{tmp_path / mode}.tif: the image's pixels are " + words):
            load_image(tmp_path / f"{mode}.tif")


def test_a_16_bit_value_marked_transparent_becomes_white(tmp_path):
    import numpy as np

    Image.fromarray(np.array([[0, 5000]], dtype=np.uint16)).save(tmp_path / "t.png", transparency=5000)
    assert np.asarray(to_rgb(load_image(tmp_path / "t.png")))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_a_16_bit_photo_with_an_orientation_tag_is_turned_upright(tmp_path):
    import numpy as np

    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5140  # 0, 5140, ... = 0, 20, ... in 8 bits
    image = Image.fromarray(values)
    exif = image.getexif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    image.save(tmp_path / "turned.png", exif=exif)
    loaded = load_image(tmp_path / "turned.png")
    assert loaded.mode == "L" and loaded.size == (3, 4)
    assert np.array_equal(np.asarray(loaded), np.rot90(values // 257, k=-1))


# Images with no pixels, and files that are not images to read.

@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_an_image_with_no_pixels_is_refused(size):
    with pytest.raises(ValueError, match=rf"the image has no pixels \({size[0]} x {size[1]}\)"):
        preprocess_image(Image.new("RGB", size))


def bomb_png(path, side=20000):
    "A 1-bit PNG header claiming side x side pixels: 65 bytes, refused before any pixel is decoded."
    path.write_bytes(png_bytes(side, side, 1, 0, []))
    return path


def test_a_decompression_bomb_says_how_many_pixels_the_limit_and_what_to_do(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    limit = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageFileError, match=rf"{path}: the image has 400,000,000 pixels, more than the {limit:,} "
                                             r"Pillow opens .*Resize it.*raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(path)


def test_the_pixel_limit_is_pillows_own(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (20, 20)).save(tmp_path / "small.png")  # 400 pixels: more than twice 100
    with pytest.raises(ImageFileError, match="the image has 400 pixels, more than the 200 Pillow opens"):
        load_image(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit switched off, as the message suggests
    assert load_image(tmp_path / "small.png").size == (20, 20)


def test_an_unreadable_file_is_called_unreadable_not_damaged(tmp_path, monkeypatch):
    import builtins
    import os

    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    if os.name == "posix" and os.geteuid() == 0:  # root reads a file of mode 000: make open refuse instead
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    else:
        path.chmod(0)
    try:
        with pytest.raises(ImageFileError, match=rf"{path}: the file cannot be read \(Permission denied\)") as e:
            load_image(path)
        assert "truncated" not in str(e.value)
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_is_refused_without_opening_it(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(ImageFileError, load_image, fifo)),
                              daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "load_image blocked on a named pipe"
    assert "is a named pipe (FIFO), not a regular file" in str(errors[0].value)
    assert "folder" not in str(errors[0].value)


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_a_device_is_not_called_a_folder():
    with pytest.raises(ImageFileError, match="/dev/null: is a device, not a regular file"):
        load_image("/dev/null")


@pytest.mark.parametrize("case", ["bomb", "fifo"])
def test_command_line_gives_one_line_for_a_bomb_and_a_pipe(case, tmp_path):
    import os

    if case == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("named pipes need a POSIX system")
    path = tmp_path / "input.png"
    if case == "bomb":
        bomb_png(path)
    else:
        os.mkfifo(path)
    result = run_python("-m", "nanopali", "--image", str(path), timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nanopali: error: {path}: ")

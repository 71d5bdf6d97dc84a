"""Bad input: each gives one clear error naming the file and the problem."""

import pytest
from PIL import Image

from nanopali.patches import ImageFileError, load_image, preprocess_image

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

"""EXIF orientation: a photo stored sideways (camera rotation in the ``Orientation`` tag) is loaded upright, so
training, eval and ``encode`` see the image a viewer shows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.images import load_image

UPRIGHT = (48, 32)  # (width, height) of the image as a viewer shows it

# Orientation tag -> how the camera stored the upright image (the inverse of what the tag tells a viewer to do)
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # tag 6: "rotate 90 degrees clockwise to display"
    8: Image.Transpose.ROTATE_270,  # tag 8: "rotate 90 degrees counter-clockwise to display"
}


def _upright() -> Image.Image:
    """16 x 16 blocks of flat colour (JPEG at quality 100 without chroma subsampling keeps them almost exactly)."""
    rng = np.random.default_rng(0)
    w, h = UPRIGHT
    blocks = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(16, axis=0).repeat(16, axis=1), mode="RGB")


def _write_rotated(path, orientation: int) -> None:
    stored = _upright().transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def _stored_pixels(path) -> Image.Image:
    """The pixels as the file stores them, without the tag (what a loader ignoring EXIF would see)."""
    with Image.open(path) as im:
        return Image.fromarray(np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_load_image_applies_the_orientation_tag(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    _write_rotated(path, orientation)
    if orientation != 3:
        assert _stored_pixels(path).size == UPRIGHT[::-1]  # really stored sideways
    for src in (path, path.read_bytes(), Image.open(path)):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == UPRIGHT
        diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(_upright(), dtype=np.int16))
        assert diff.max() <= 8, f"orientation {orientation}: not upright (max pixel diff {diff.max()})"


def test_images_without_a_tag_are_unchanged(tmp_path):
    path = tmp_path / "plain.jpg"
    _upright().save(path, "JPEG", quality=100, subsampling=0)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(_stored_pixels(path)))
    exif = Image.Exif()
    exif[0x0112] = 1  # "already upright"
    _upright().save(tmp_path / "one.jpg", "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    assert load_image(tmp_path / "one.jpg").size == UPRIGHT


def test_encode_sees_the_upright_image(tiny_model, tmp_path):
    path = tmp_path / "o6.jpg"
    _write_rotated(path, 6)
    upright = _stored_pixels(path).transpose(Image.Transpose.ROTATE_270)  # the same decoded pixels, turned upright
    assert upright.size == UPRIGHT
    got = tiny_model.encode(images=[str(path)], instruction="query")
    np.testing.assert_allclose(got, tiny_model.encode(images=[upright], instruction="query"), atol=1e-6)
    sideways = tiny_model.encode(images=[_stored_pixels(path)], instruction="query")
    assert not np.allclose(got, sideways, atol=1e-4)  # the orientation matters to the model

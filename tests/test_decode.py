"""pipeline.decode: every pixel layout a COCO-style dataset ships ends up as RGB uint8 [H, W, 3]."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import ImageDecodeError, ImageSizeMismatchError, decode_image


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes, **kwargs: object) -> np.ndarray:
    return decode_image(data, image_id=7, file_name="a/b.jpg", **kwargs)


def test_rgb_jpeg_is_hwc_uint8_contiguous() -> None:
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    out = _decode(_encode(Image.fromarray(pixels), "JPEG", quality=95), expected_size=(40, 24))
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous
    assert np.abs(out[4:20, 2:16].astype(int) - (255, 0, 0)).max() < 12
    assert np.abs(out[4:20, 24:38].astype(int) - (0, 0, 255)).max() < 12


def test_exif_orientation_is_applied_and_checked_against_annotation() -> None:
    stored = np.zeros((32, 64, 3), np.uint8)  # stored W=64, H=32
    stored[:16, :16] = (255, 0, 0)  # red block at the stored top-left
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation 6: display = stored rotated 90 degrees clockwise
    data = _encode(image, "JPEG", quality=95, exif=exif.tobytes())

    out = _decode(data, expected_size=(32, 64))
    assert out.shape == (64, 32, 3)
    # Rotating clockwise moves the stored top-left corner to the displayed top-right corner.
    assert np.abs(out[2:14, 18:30].astype(int) - (255, 0, 0)).max() < 20
    assert out[2:14, 2:14].max() < 20

    with pytest.raises(ImageSizeMismatchError, match=r"image id 7 .*a/b\.jpg.*EXIF orientation"):
        _decode(data, expected_size=(64, 32))  # annotated on the un-rotated image


def test_cmyk_jpeg_converts_to_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = _decode(data)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - (255, 0, 0)).max() < 10


def test_16bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = _decode(data, expected_size=(6, 1))
    assert out.dtype == np.uint8 and out.shape == (1, 6, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 128, 255, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_palette_with_transparency_expands_the_palette_without_warnings() -> None:
    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    indices = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    data = _encode(image, "PNG", transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _decode(data)
    expected = np.array([[(10, 20, 30), (200, 100, 50), (200, 100, 50)], [(200, 100, 50), (10, 20, 30), (10, 20, 30)]])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_colour_kept(mode: str) -> None:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (90, 90, 90)
    rgba[..., 3] = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12  # varying alpha, incl. fully transparent
    image = Image.fromarray(rgba, mode="RGBA").convert(mode)
    out = _decode(_encode(image, "PNG"))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, np.full((4, 5, 3), 90, np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_replicates_to_three_channels(fmt: str) -> None:
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    out = _decode(_encode(Image.fromarray(gray, mode="L"), fmt))
    assert out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    if fmt == "PNG":
        np.testing.assert_array_equal(out[..., 1], gray)


def test_bilevel_image() -> None:
    out = _decode(_encode(Image.new("1", (3, 2), 1), "PNG"))
    np.testing.assert_array_equal(out, np.full((2, 3, 3), 255, np.uint8))


def test_one_by_one_image() -> None:
    out = _decode(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), expected_size=(1, 1))
    np.testing.assert_array_equal(out, [[[1, 2, 3]]])


def test_size_mismatch_names_the_image() -> None:
    data = _encode(Image.new("RGB", (10, 20)), "PNG")
    with pytest.raises(ImageSizeMismatchError, match=r"image id 7 \('a/b\.jpg'\).*10x20.*20x10"):
        _decode(data, expected_size=(20, 10))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        b"\xff\xd8\xff\xe0" + b"\x00" * 64,  # a JPEG header and nothing after
    ],
    ids=["empty", "garbage", "jpeg-header-only"],
)
def test_corrupt_bytes_raise_a_value_error_naming_the_image(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match=r"image id 7 \('a/b\.jpg'\)") as info:
        _decode(data)
    assert isinstance(info.value, ValueError)


def test_truncated_jpeg_is_an_error_not_a_grey_image() -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match=r"image id 7"):
        _decode(data[: len(data) // 2])

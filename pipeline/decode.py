"""Decode encoded image bytes (JPEG, PNG, anything Pillow reads) into RGB uint8 ``[H, W, 3]`` arrays.

The conventions match what detectron2 (``convert_PIL_to_numpy``), torchvision (``decode_image(mode=RGB)``)
and mmcv (``imfrombytes``) feed a detector, so weights trained there see the same pixels here:

* EXIF orientation is applied first (``ImageOps.exif_transpose``): COCO's ``width``/``height`` describe the
  image as displayed, so sizes and boxes refer to the transposed image.
* Alpha is dropped, not composited (LA, RGBA, and palette images with transparency go through RGBA so the
  palette is expanded correctly, then the alpha channel is discarded).
* 16-bit images (``I;16``, ``I;16B``, ``I``) are scaled down by keeping the high byte (``v >> 8``), the same
  reduction Pillow applies to 16-bit RGB PNGs, so 65535 -> 255 and nothing saturates.
* Grayscale, bilevel, CMYK, YCbCr and LAB are converted with Pillow's ``convert("RGB")``.

Corrupt or truncated bytes raise :class:`ImageDecodeError`; a decoded size that disagrees with the annotation
raises :class:`ImageSizeMismatchError`. Both are ``ValueError`` subclasses whose message names the image id and
the file name.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Alpha modes that must be expanded through RGBA first (RGBA itself converts to RGB directly).
_ALPHA_MODES = frozenset({"LA", "La", "RGBa", "PA"})


class ImageDecodeError(ValueError):
    """Encoded bytes that Pillow cannot decode (corrupt, truncated, empty or an unsupported pixel mode)."""


class ImageSizeMismatchError(ValueError):
    """The decoded image's size disagrees with the annotation's ``width``/``height``."""


def decode_image(
    data: bytes,
    *,
    image_id: int,
    file_name: str,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode ``data`` into an RGB uint8 array of shape ``[H, W, 3]`` (C-contiguous; may be read-only).

    Args:
        data: the encoded file as stored (JPEG, PNG, ...).
        image_id: COCO image id, used in error messages only.
        file_name: COCO file name, used in error messages only.
        expected_size: ``(width, height)`` from the annotation. When given, the decoded size after EXIF
            transposition must equal it, otherwise the boxes would not match the pixels.

    Raises:
        ImageDecodeError: the bytes are not a decodable image.
        ImageSizeMismatchError: the decoded ``(width, height)`` differs from ``expected_size``.
    """
    where = f"image id {image_id} ({file_name!r})"
    if not data:
        raise ImageDecodeError(f"{where}: the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and later raises) on decompression bombs; surface both as decode errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                stored_size = opened.size
                ImageOps.exif_transpose(opened, in_place=True)  # no copy when there is nothing to transpose
                pixels = _to_rgb_uint8(opened, where)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{where}: cannot decode the image bytes ({len(data)} bytes): {e}") from e

    height, width = pixels.shape[:2]
    if expected_size is not None and (width, height) != tuple(expected_size):
        raise ImageSizeMismatchError(_size_message(where, (width, height), stored_size, expected_size))
    return pixels


def _to_rgb_uint8(image: Image.Image, where: str) -> np.ndarray:
    """Convert an already loaded Pillow image of any supported mode to RGB uint8 ``[H, W, 3]``."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64, copy=False)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        raise ImageDecodeError(f"{where}: floating-point ('F' mode) images are not supported")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"{where}: unexpected decoded array {pixels.dtype} {pixels.shape} (mode {mode})")
    return pixels if pixels.flags.c_contiguous else np.ascontiguousarray(pixels)


def _size_message(where: str, decoded: tuple[int, int], stored: tuple[int, int], expected: tuple[int, int]) -> str:
    message = (
        f"{where}: decoded size {decoded[0]}x{decoded[1]} (width x height, after EXIF orientation) differs "
        f"from the annotation's {expected[0]}x{expected[1]}; its boxes would not match the pixels"
    )
    if stored != decoded and tuple(expected) == stored:
        message += (
            f". The annotation matches the stored, un-rotated size {stored[0]}x{stored[1]}: the file carries "
            "an EXIF orientation tag that the annotation tool ignored; strip the tag or re-annotate"
        )
    return message

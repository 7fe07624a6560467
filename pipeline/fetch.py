"""Fetch the encoded bytes of a batch of images and check them, for Ray Data ``map_batches``.

Input batch: a ``pyarrow.Table`` with at least ``image_id`` (int64), ``file_name`` (string), ``width`` and
``height`` (int32) columns (see :func:`records_to_table`). Output: the same rows plus ``image`` (binary, the
original bytes), minus the rows whose image is missing or broken, which come back as :class:`ImageProblem`.

An image is checked without a full-resolution decode: Pillow reads the header (format, size, EXIF orientation)
and decodes JPEGs at 1/8 scale (``Image.draft``), which still walks the whole entropy-coded stream, so
truncated or garbled files are caught at a fraction of the cost. Its size as displayed (after the EXIF
orientation, as :mod:`pipeline.decode` applies it) must be the annotated ``width x height``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import storage
from pipeline.coco import ImageRecord, safe_join

_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
PROBLEM_REASONS = ("missing", "corrupt", "size_mismatch")


@dataclass(frozen=True)
class ImageProblem:
    """An image that could not be used: ``reason`` is one of :data:`PROBLEM_REASONS`."""

    image_id: int
    file_name: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"image_id": self.image_id, "file_name": self.file_name, "reason": self.reason, "detail": self.detail}


def records_to_table(records: Sequence[ImageRecord]) -> pa.Table:
    """Records as an Arrow table: the Parquet contract's columns except ``image`` (boxes flattened xyxy)."""

    def lists(values: list[np.ndarray], typ: pa.DataType) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
        flat = np.concatenate(values) if values else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=typ))

    return pa.table(
        {
            "image_id": pa.array([r.image_id for r in records], pa.int64()),
            "file_name": pa.array([r.file_name for r in records], pa.string()),
            "width": pa.array([r.width for r in records], pa.int32()),
            "height": pa.array([r.height for r in records], pa.int32()),
            "boxes": lists([r.boxes.reshape(-1) for r in records], pa.float32()),
            "labels": lists([r.labels for r in records], pa.int32()),
            "iscrowd": lists([r.iscrowd for r in records], pa.bool_()),
            "area": lists([r.area for r in records], pa.float32()),
        }
    )


def check_image(data: bytes, width: int, height: int) -> tuple[str, str] | None:
    """``None`` if ``data`` is a readable image of the annotated size, else ``(reason, detail)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                if im.format == "JPEG":
                    im.draft(None, (max(size[0] // 8, 1), max(size[1] // 8, 1)))
                im.load()
    except Exception as exc:  # Pillow raises many types for bad bytes (OSError, SyntaxError, ValueError, ...)
        return "corrupt", f"{type(exc).__name__}: {exc}"
    displayed = size[::-1] if orientation in _TRANSPOSING_ORIENTATIONS else size
    if displayed == (width, height):
        return None
    return "size_mismatch", (
        f"the image is {displayed[0]}x{displayed[1]} as displayed (stored {size[0]}x{size[1]}, EXIF orientation "
        f"{orientation}), annotated {width}x{height}"
    )


def fetch_images(
    batch: pa.Table,
    images_uri: str,
    config: storage.StorageConfig | None = None,
    *,
    io_threads: int = 8,
) -> tuple[pa.Table, list[ImageProblem]]:
    """Read and check every image of ``batch`` (``io_threads`` concurrent reads); see the module docstring.

    Returns the rows with readable images, with an ``image`` column appended, and the problems of the others.
    Raises :class:`pipeline.storage.StorageError` for anything but a missing object (credentials, bucket,
    endpoint): those are not per-image problems.
    """
    fs, _ = storage.resolve(images_uri, config)
    ids = batch.column("image_id").to_pylist()
    names = batch.column("file_name").to_pylist()
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()

    uris = [safe_join(images_uri, name) for name in names]
    results: list[bytes | ImageProblem] = []
    for i, data in enumerate(storage.read_many(uris, config, filesystem=fs, threads=io_threads)):
        if isinstance(data, storage.ObjectNotFoundError):
            results.append(ImageProblem(ids[i], names[i], "missing", str(data)))
        elif isinstance(data, storage.StorageError):
            raise data
        else:
            problem = check_image(data, widths[i], heights[i])
            results.append(data if problem is None else ImageProblem(ids[i], names[i], *problem))
    keep = [not isinstance(r, ImageProblem) for r in results]
    problems = [r for r in results if isinstance(r, ImageProblem)]
    kept = batch.filter(pa.array(keep, pa.bool_())) if problems else batch
    images = pa.array([r for r in results if not isinstance(r, ImageProblem)], pa.binary())
    return kept.append_column(pa.field("image", pa.binary(), nullable=False), images), problems

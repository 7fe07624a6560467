"""Parse a COCO instances JSON (local or ``s3://``) into validated, per-image records.

Conventions of every :class:`ImageRecord`:

* ``boxes``: float32 ``[N, 4]``, ``(x1, y1, x2, y2)`` in absolute pixels of the image as displayed (COCO's
  ``width``/``height``), converted from COCO's ``[x, y, w, h]`` and clipped to ``[0, width] x [0, height]``.
* ``labels``: int32 ``[N]``, contiguous 1..K (0 is background and never appears), see :class:`CategoryMap`.
* ``iscrowd``: bool ``[N]``: crowd regions are kept (evaluation needs them; training ignores them as positives).
* ``area``: float32 ``[N]``: the annotation's ``area`` (segmentation area, what COCO evaluation buckets by),
  or the clipped box area when the annotation has none.

Boxes that cannot be used are dropped and counted by reason (:data:`DROP_REASONS`), with the first few
annotation ids of each reason kept as examples: nothing is lost silently. Structural problems raise
:class:`DatasetError` naming the file, the annotation / image id and what to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.categories import CategoryMap

__all__ = [
    "DROP_REASONS",
    "CategoryMap",
    "CocoDataset",
    "DatasetError",
    "ImageRecord",
    "check_file_name",
    "load_coco",
    "parse_coco",
    "safe_join",
]

DROP_REASONS: tuple[str, ...] = (
    "bbox_wrong_length",  # bbox is not a list of 4 numbers
    "bbox_not_finite",  # NaN, inf or not a number
    "bbox_negative_size",  # w < 0 or h < 0
    "bbox_outside_image",  # no overlap with the image at all
    "bbox_smaller_than_1px",  # narrower or shorter than 1 px after clipping
    "image_without_annotations",  # only with drop_images_without_annotations=True
)
MIN_BOX_SIZE = 1.0
_MAX_EXAMPLES = 5


class DatasetError(ValueError):
    """The dataset is malformed; the message names the file, the offending id and what to fix."""


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its annotations (arrays are read-only; shapes and conventions in the module docstring)."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    labels: np.ndarray  # int32 [N], 1..K
    iscrowd: np.ndarray  # bool [N]
    area: np.ndarray  # float32 [N]

    def __post_init__(self) -> None:
        n = len(self.labels)
        expected = {
            "boxes": (np.float32, (n, 4)),
            "labels": (np.int32, (n,)),
            "iscrowd": (np.bool_, (n,)),
            "area": (np.float32, (n,)),
        }
        for name, (dtype, shape) in expected.items():
            arr = getattr(self, name)
            if arr.dtype != dtype or arr.shape != shape:
                raise ValueError(
                    f"ImageRecord {self.image_id}: {name} must be {np.dtype(dtype).name} {list(shape)}, "
                    f"got {arr.dtype} {list(arr.shape)}"
                )
            arr.flags.writeable = False

    @property
    def num_boxes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CocoDataset:
    """The validated content of one instances JSON.

    Attributes:
        source_uri: where it was read from.
        records: one per image, sorted by ``image_id``.
        categories: category id <-> label <-> name.
        drop_counts: every reason of :data:`DROP_REASONS` -> how many annotations (or images) were dropped.
        drop_examples: reason -> the first few annotation ids (image ids for ``image_without_annotations``).
        fingerprint: sha256 hex digest of the JSON bytes.
        num_source_images, num_source_annotations: counts in the file, before any drop.
        num_clipped: boxes kept after clipping to the image.
    """

    source_uri: str
    records: tuple[ImageRecord, ...]
    categories: CategoryMap
    drop_counts: Mapping[str, int]
    drop_examples: Mapping[str, tuple[int, ...]]
    fingerprint: str
    num_source_images: int
    num_source_annotations: int
    num_clipped: int

    @property
    def num_annotations(self) -> int:
        """Boxes kept (crowd included)."""
        return sum(r.num_boxes for r in self.records)


def check_file_name(file_name: object, where: str) -> str:
    """``file_name`` normalised (``./`` and repeated ``/`` removed) if it is a relative path that stays under
    the image root, else :class:`DatasetError`.

    Refused: empty names, absolute paths, ``..`` segments, backslashes, URI schemes (``s3://``), NUL bytes.
    """
    problem = None
    if not isinstance(file_name, str) or not file_name.strip(" /."):
        problem = "is empty or not a string"
    elif "\\" in file_name:
        problem = "contains a backslash"
    elif "\x00" in file_name:
        problem = "contains a NUL byte"
    elif file_name.startswith("/") or re.match(r"^[A-Za-z]:", file_name):
        problem = "is an absolute path"
    elif "://" in file_name:
        problem = "is a URI, not a path relative to the image root"
    elif ".." in file_name.split("/"):
        problem = "contains a '..' segment"
    if problem:
        raise DatasetError(
            f"{where}: file_name {file_name!r} {problem}; file names must be relative paths under the "
            "image root (e.g. '000123.jpg' or 'train/000123.jpg'). Fix the 'images' entry."
        )
    assert isinstance(file_name, str)
    return "/".join(part for part in file_name.split("/") if part not in ("", "."))


def safe_join(images_root_uri: str, file_name: str) -> str:
    """The URI of ``file_name`` under ``images_root_uri``; raises :class:`DatasetError` if it would escape."""
    return storage.join(images_root_uri, check_file_name(file_name, images_root_uri))


def load_coco(
    annotations_uri: str,
    config: storage.StorageConfig | None = None,
    *,
    drop_images_without_annotations: bool = False,
) -> CocoDataset:
    """Read and validate the instances JSON at ``annotations_uri`` (local path or ``s3://``).

    Raises:
        DatasetError: malformed or truncated JSON, a missing required key, an unknown category id, a
            duplicate image / annotation / category id, an annotation of a missing image, a ``file_name``
            escaping the image root, ``width``/``height`` < 1.
        pipeline.storage.StorageError: the file cannot be read.
    """
    data = storage.read_bytes(annotations_uri, config)
    return parse_coco(data, annotations_uri, drop_images_without_annotations=drop_images_without_annotations)


def parse_coco(data: bytes, source: str, *, drop_images_without_annotations: bool = False) -> CocoDataset:
    """:func:`load_coco` on bytes already read; ``source`` names the file in messages."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{source}: not valid JSON ({exc}); the file is malformed or truncated ({len(data)} bytes). "
            "Re-export or re-upload it."
        ) from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{source}: the top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DatasetError(f"{source}: missing required key {key!r} (a list); is this a COCO instances file?")

    categories = _parse_categories(doc["categories"], source)
    images = _parse_images(doc["images"], source)
    per_image: dict[int, list[tuple[list[float], int, bool, float]]] = {iid: [] for iid in images}
    drops = {reason: 0 for reason in DROP_REASONS}
    examples: dict[str, list[int]] = {reason: [] for reason in DROP_REASONS}
    seen_ann: set[int] = set()
    clipped = 0
    for i, ann in enumerate(doc["annotations"]):
        ann_id = _get(ann, "id", f"{source}: annotations[{i}]")
        where = f"{source}: annotation id {ann_id!r}"
        ann_id = _as_int(ann_id, where, "id")
        if ann_id in seen_ann:
            raise DatasetError(f"{where} appears twice; annotation ids must be unique.")
        seen_ann.add(ann_id)
        image_id = _as_int(_get(ann, "image_id", where), where, "image_id")
        if image_id not in images:
            raise DatasetError(
                f"{where} refers to image id {image_id}, which is not in 'images'. Add the image or remove "
                "the annotation."
            )
        category_id = _as_int(_get(ann, "category_id", where), where, "category_id")
        if category_id not in categories:
            raise DatasetError(
                f"{where} (image id {image_id}) has category_id {category_id}, which is not in 'categories' "
                f"(known ids: {', '.join(map(str, categories.category_ids))}). Fix the annotation or add "
                "the category."
            )
        _, _, width, height = images[image_id]
        box, reason = _clip_box(_get(ann, "bbox", where), width, height)
        if reason is not None:
            drops[reason] += 1
            if len(examples[reason]) < _MAX_EXAMPLES:
                examples[reason].append(ann_id)
            continue
        assert box is not None
        raw = ann["bbox"]
        if box != [raw[0], raw[1], raw[0] + raw[2], raw[1] + raw[3]]:
            clipped += 1
        iscrowd = ann.get("iscrowd", 0)
        if not isinstance(iscrowd, int | float) or iscrowd not in (0, 1):  # "0" (a truthy string) is refused
            raise DatasetError(
                f"{where} (image id {image_id}) has iscrowd {iscrowd!r}; expected 0 or 1. Fix the annotation."
            )
        area = ann.get("area")
        if not isinstance(area, int | float) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
            area = (box[2] - box[0]) * (box[3] - box[1])
        per_image[image_id].append((box, categories.label_of(category_id), bool(iscrowd), float(area)))

    records = []
    for image_id in sorted(images):
        anns = per_image[image_id]
        if not anns and drop_images_without_annotations:
            drops["image_without_annotations"] += 1
            if len(examples["image_without_annotations"]) < _MAX_EXAMPLES:
                examples["image_without_annotations"].append(image_id)
            continue
        _, file_name, width, height = images[image_id]
        records.append(
            ImageRecord(
                image_id=image_id,
                file_name=file_name,
                width=width,
                height=height,
                boxes=np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                labels=np.array([a[1] for a in anns], dtype=np.int32),
                iscrowd=np.array([a[2] for a in anns], dtype=bool),
                area=np.array([a[3] for a in anns], dtype=np.float32),
            )
        )
    return CocoDataset(
        source_uri=source,
        records=tuple(records),
        categories=categories,
        drop_counts=drops,
        drop_examples={k: tuple(v) for k, v in examples.items()},
        fingerprint=hashlib.sha256(data).hexdigest(),
        num_source_images=len(images),
        num_source_annotations=len(doc["annotations"]),
        num_clipped=clipped,
    )


def _clip_box(bbox: Any, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """COCO ``[x, y, w, h]`` -> clipped ``[x1, y1, x2, y2]``, or ``(None, drop reason)``."""
    if not isinstance(bbox, Sequence) or isinstance(bbox, str) or len(bbox) != 4:
        return None, "bbox_wrong_length"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None, "bbox_not_finite"
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return None, "bbox_negative_size"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return None, "bbox_outside_image"
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
        return None, "bbox_smaller_than_1px"
    return [x1, y1, x2, y2], None


def _parse_categories(entries: list[Any], source: str) -> CategoryMap:
    pairs: dict[int, str] = {}
    for i, cat in enumerate(entries):
        where = f"{source}: categories[{i}]"
        cid = _as_int(_get(cat, "id", where), where, "id")
        name = _get(cat, "name", f"{source}: category id {cid}")
        if cid in pairs:
            raise DatasetError(f"{source}: category id {cid} appears twice; category ids must be unique.")
        pairs[cid] = str(name)
    if not pairs:
        raise DatasetError(f"{source}: 'categories' is empty; a detection dataset needs at least one category.")
    return CategoryMap.from_pairs(list(pairs.items()))


def _parse_images(entries: list[Any], source: str) -> dict[int, tuple[int, str, int, int]]:
    images: dict[int, tuple[int, str, int, int]] = {}
    for i, img in enumerate(entries):
        raw_id = _get(img, "id", f"{source}: images[{i}]")
        where = f"{source}: image id {raw_id!r}"
        image_id = _as_int(raw_id, where, "id")
        if image_id in images:
            raise DatasetError(f"{where} appears twice in 'images'; image ids must be unique.")
        file_name = check_file_name(_get(img, "file_name", where), where)
        width = _as_int(_get(img, "width", where), f"{where} ({file_name})", "width")
        height = _as_int(_get(img, "height", where), f"{where} ({file_name})", "height")
        if width < 1 or height < 1:
            raise DatasetError(
                f"{where} ({file_name}): width and height must be >= 1, got {width}x{height}. Fix the "
                "'images' entry (COCO sizes are of the image as displayed)."
            )
        images[image_id] = (image_id, file_name, width, height)
    return images


def _get(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise DatasetError(f"{where}: missing required key {key!r}")
    return entry[key]


def _as_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise DatasetError(f"{where}: {key!r} must be an integer, got {value!r}")
    return int(value)

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
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.categories import CategoryMap
from pipeline.json_items import JSONError, TopLevelLists

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

    The file is streamed (:class:`pipeline.json_items.TopLevelLists`): memory holds the records and one column
    of numbers per annotation field, never the parsed document, so a file takes well under twice its size. A
    file outside strict JSON (``NaN``/``Infinity`` literals, which Python's ``json`` writes by default, UTF-16)
    or malformed is read again whole and parsed with ``json`` (its error names the problem).

    Raises:
        DatasetError: malformed or truncated JSON, a missing required key, an unknown category id, a
            duplicate image / annotation / category id, an annotation of a missing image, a ``file_name``
            escaping the image root, ``width``/``height`` < 1.
        pipeline.storage.StorageError: the file cannot be read.
    """
    drop = drop_images_without_annotations
    try:
        chunks = storage.read_chunks(annotations_uri, config, chunk_size=_READ_SIZE)
        return _parse_stream(chunks, annotations_uri, drop)
    except JSONError:
        data = storage.read_bytes(annotations_uri, config)
        return _parse_document(data, annotations_uri, drop)


def parse_coco(data: bytes, source: str, *, drop_images_without_annotations: bool = False) -> CocoDataset:
    """:func:`load_coco` on bytes already read; ``source`` names the file in messages."""
    view = memoryview(data)
    chunks = (view[i : i + _CHUNK] for i in range(0, len(data), _CHUNK))
    try:
        return _parse_stream(chunks, source, drop_images_without_annotations)
    except JSONError:
        return _parse_document(data, source, drop_images_without_annotations)


_CHUNK = 1 << 20
_READ_SIZE = 4 << 20  # bytes per read of the file (an S3 GET each); the parser takes 64 KiB at a time
_SECTIONS = ("images", "annotations", "categories")


def _parse_stream(chunks: Iterable[bytes], source: str, drop_empty: bool) -> CocoDataset:
    """One pass over the JSON bytes: images checked as they come, annotations kept as columns of numbers."""
    doc = TopLevelLists(chunks, _SECTIONS, skip={"annotations": ("segmentation",)})
    columns = _AnnotationColumns(source)
    images: dict[int, tuple[int, str, int, int]] = {}
    category_entries: list[Any] = []
    counts = {"images": 0, "annotations": 0}
    for section, entry in doc.items():
        if section == "annotations":
            columns.add(entry, counts["annotations"])
            counts["annotations"] += 1
        elif section == "images":
            _add_image(images, entry, counts["images"], source)
            counts["images"] += 1
        else:
            category_entries.append(entry)
    _check_top_level(doc.top_level == "object", doc.lists, source)
    categories = _parse_categories(category_entries, source)
    return columns.dataset(images, categories, doc.sha256, drop_empty)


def _parse_document(data: bytes, source: str, drop_empty: bool) -> CocoDataset:
    """The whole-document path: ``json.loads``, then the same checks in the same order of keys."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{source}: not valid JSON ({exc}); the file is malformed or truncated ({len(data)} bytes). "
            "Re-export or re-upload it."
        ) from None
    is_object = isinstance(doc, dict)
    _check_top_level(is_object, {k for k in _SECTIONS if is_object and isinstance(doc.get(k), list)}, source)
    categories = _parse_categories(doc["categories"], source)
    images: dict[int, tuple[int, str, int, int]] = {}
    for i, entry in enumerate(doc["images"]):
        _add_image(images, entry, i, source)
    columns = _AnnotationColumns(source)
    for i, entry in enumerate(doc["annotations"]):
        columns.add(entry, i)
    return columns.dataset(images, categories, hashlib.sha256(data).hexdigest(), drop_empty)


def _check_top_level(is_object: bool, lists: set[str], source: str) -> None:
    if not is_object:
        raise DatasetError(f"{source}: the top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in _SECTIONS:
        if key not in lists:
            raise DatasetError(f"{source}: missing required key {key!r} (a list); is this a COCO instances file?")


# the drop reason of each annotation, as a number: 0 kept, else 1 + its index in DROP_REASONS
_CODE = {reason: i + 1 for i, reason in enumerate(DROP_REASONS) if reason.startswith("bbox_")}
_BAD_CROWD = 2  # iscrowd column: 0, 1, or this (the value kept in _AnnotationColumns.bad_crowd)


class _AnnotationColumns:
    """The fields that records need of every annotation, as compact columns (about 70 bytes an annotation), in
    file order; the checks that need the images and categories run on the columns once all are read."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.ids = array("q")
        self.image_ids = array("q")
        self.category_ids = array("q")
        self.xywh = array("d")
        self.bbox_code = array("b")
        self.area = array("d")  # NaN: absent or unusable, the clipped box area is used
        self.crowd = array("b")
        self.bad_crowd: dict[int, Any] = {}

    def add(self, ann: Any, i: int) -> None:
        if (
            type(ann) is dict
            and type(ann_id := ann.get("id")) is int
            and type(image_id := ann.get("image_id")) is int
            and type(category_id := ann.get("category_id")) is int
            and "bbox" in ann
        ):
            bbox = ann["bbox"]
        else:  # the checks of the slow path raise the message naming the annotation and the field
            ann_id = _get(ann, "id", f"{self.source}: annotations[{i}]")
            where = f"{self.source}: annotation id {ann_id!r}"
            ann_id = _as_int(ann_id, where, "id")
            image_id = _as_int(_get(ann, "image_id", where), where, "image_id")
            category_id = _as_int(_get(ann, "category_id", where), where, "category_id")
            bbox = _get(ann, "bbox", where)
        code = 0
        if not isinstance(bbox, Sequence) or isinstance(bbox, str) or len(bbox) != 4:
            code, bbox = _CODE["bbox_wrong_length"], (math.nan,) * 4
        elif not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            code, bbox = _CODE["bbox_not_finite"], (math.nan,) * 4
        iscrowd = ann.get("iscrowd", 0)
        if isinstance(iscrowd, int | float) and iscrowd in (0, 1):  # "0" (a truthy string) is refused
            crowd = int(iscrowd)
        else:
            crowd = _BAD_CROWD
            self.bad_crowd[len(self.crowd)] = iscrowd
        area = ann.get("area")
        if not isinstance(area, int | float) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
            area = math.nan
        try:
            self.ids.append(ann_id)
            self.image_ids.append(image_id)
            self.category_ids.append(category_id)
        except OverflowError:
            raise DatasetError(f"{self.source}: annotation id {ann_id}: an id is outside the 64-bit range") from None
        self.xywh.extend(float(v) for v in bbox)
        self.bbox_code.append(code)
        self.area.append(float(area))
        self.crowd.append(crowd)

    def dataset(
        self,
        images: dict[int, tuple[int, str, int, int]],
        categories: CategoryMap,
        fingerprint: str,
        drop_empty: bool,
    ) -> CocoDataset:
        """Check every annotation against ``images`` and ``categories``, drop and clip boxes, build records."""
        ids = np.frombuffer(self.ids, dtype=np.int64)
        image_ids = np.frombuffer(self.image_ids, dtype=np.int64)
        x, y, w, h = np.frombuffer(self.xywh, dtype=np.float64).reshape(-1, 4).T
        code = np.frombuffer(self.bbox_code, dtype=np.int8).copy()
        crowd = np.frombuffer(self.crowd, dtype=np.int8)

        known_ids = np.array(sorted(images), dtype=np.int64)
        pos = np.minimum(np.searchsorted(known_ids, image_ids), max(len(known_ids) - 1, 0))
        image_known = known_ids[pos] == image_ids if len(known_ids) else np.zeros(len(ids), bool)
        sizes = np.array([images[i][2:] for i in known_ids.tolist()], dtype=np.float64).reshape(-1, 2)
        width, height = sizes[pos].T if len(known_ids) else np.zeros((2, len(ids)))
        cat_ids = np.array(categories.category_ids, dtype=np.int64)
        cats = np.frombuffer(self.category_ids, dtype=np.int64)
        label = np.minimum(np.searchsorted(cat_ids, cats), len(cat_ids) - 1)
        category_known = cat_ids[label] == cats

        with np.errstate(invalid="ignore"):
            code[(code == 0) & ((w < 0) | (h < 0))] = _CODE["bbox_negative_size"]
            outside = (x >= width) | (y >= height) | (x + w <= 0) | (y + h <= 0)
            code[(code == 0) & outside] = _CODE["bbox_outside_image"]
            x1, y1 = np.clip(x, 0.0, width), np.clip(y, 0.0, height)
            x2, y2 = np.clip(x + w, 0.0, width), np.clip(y + h, 0.0, height)
            code[(code == 0) & ((x2 - x1 < MIN_BOX_SIZE) | (y2 - y1 < MIN_BOX_SIZE))] = _CODE["bbox_smaller_than_1px"]
        kept = code == 0
        bad_crowd = kept & (crowd == _BAD_CROWD)
        self._raise_first_error(ids, image_ids, cats, categories, image_known, category_known, bad_crowd)

        drops = {reason: 0 for reason in DROP_REASONS}
        examples: dict[str, tuple[int, ...]] = {reason: () for reason in DROP_REASONS}
        for reason, value in _CODE.items():
            where = np.flatnonzero(code == value)
            drops[reason] = len(where)
            examples[reason] = tuple(ids[where[:_MAX_EXAMPLES]].tolist())
        clipped = int(np.count_nonzero(kept & ((x1 != x) | (y1 != y) | (x2 != x + w) | (y2 != y + h))))

        order = np.flatnonzero(kept)
        order = order[np.argsort(image_ids[order], kind="stable")]  # by image, file order within an image
        area = np.frombuffer(self.area, dtype=np.float64)[order]
        box_area = (x2[order] - x1[order]) * (y2[order] - y1[order])
        columns = (
            np.stack([x1[order], y1[order], x2[order], y2[order]], axis=1).astype(np.float32),
            (label[order] + 1).astype(np.int32),
            crowd[order] == 1,
            np.where(np.isnan(area), box_area, area).astype(np.float32),
        )
        bounds = np.searchsorted(image_ids[order], known_ids), np.searchsorted(image_ids[order], known_ids, "right")
        records = []
        empty: list[int] = []
        for image_id, a, b in zip(known_ids.tolist(), *(v.tolist() for v in bounds), strict=True):
            if a == b and drop_empty:
                empty.append(image_id)
                continue
            _, file_name, img_width, img_height = images[image_id]
            boxes, labels, iscrowd, areas = (c[a:b] for c in columns)
            records.append(ImageRecord(image_id, file_name, img_width, img_height, boxes, labels, iscrowd, areas))
        drops["image_without_annotations"] = len(empty)
        examples["image_without_annotations"] = tuple(empty[:_MAX_EXAMPLES])
        return CocoDataset(
            source_uri=self.source,
            records=tuple(records),
            categories=categories,
            drop_counts=drops,
            drop_examples=examples,
            fingerprint=fingerprint,
            num_source_images=len(images),
            num_source_annotations=len(ids),
            num_clipped=clipped,
        )

    def _raise_first_error(
        self,
        ids: np.ndarray,
        image_ids: np.ndarray,
        cats: np.ndarray,
        categories: CategoryMap,
        image_known: np.ndarray,
        category_known: np.ndarray,
        bad_crowd: np.ndarray,
    ) -> None:
        """The error of the first annotation (file order) that has one, checked in the order of its fields."""
        order = np.argsort(ids, kind="stable")
        repeated = np.zeros(len(ids), bool)
        repeated[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        checks = (repeated, ~image_known, ~category_known, bad_crowd)
        firsts = [(int(np.argmax(c)), kind) for kind, c in enumerate(checks) if c.any()]
        if not firsts:
            return
        i, kind = min(firsts)
        ann_id, image_id = int(ids[i]), int(image_ids[i])
        where = f"{self.source}: annotation id {ann_id!r}"
        if kind == 0:
            raise DatasetError(f"{where} appears twice; annotation ids must be unique.")
        if kind == 1:
            raise DatasetError(
                f"{where} refers to image id {image_id}, which is not in 'images'. Add the image or remove "
                "the annotation."
            )
        if kind == 2:
            known = ", ".join(map(str, categories.category_ids))
            raise DatasetError(
                f"{where} (image id {image_id}) has category_id {int(cats[i])}, which is not in 'categories' "
                f"(known ids: {known}). Fix the annotation or add the category."
            )
        raise DatasetError(
            f"{where} (image id {image_id}) has iscrowd {self.bad_crowd[i]!r}; expected 0 or 1. Fix the annotation."
        )


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


def _add_image(images: dict[int, tuple[int, str, int, int]], img: Any, i: int, source: str) -> None:
    """Check the ``images`` entry ``img`` (the ``i``-th) and add it to ``images`` (id -> (id, file name, w, h))."""
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

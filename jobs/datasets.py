"""What a job needs to know about its datasets, read on the driver without images: image count, category
map, fingerprint, what was dropped from the annotations, and the ground truth in COCO form (original pixels,
real category ids) for evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from jobs.config import DatasetSpec
from pipeline.categories import CategoryMap
from pipeline.coco import CocoDataset, load_coco
from pipeline.manifest import read_manifest
from pipeline.storage import StorageConfig, resolve
from pipeline.stream import CocoSource, ParquetSource, Source

_GT_COLUMNS = ["image_id", "file_name", "width", "height", "boxes", "labels", "iscrowd", "area"]


@dataclass(frozen=True)
class DatasetInfo:
    """``num_images`` rows the stream yields, the category map, a fingerprint of the source, and the COCO
    ground-truth dict (``images``, ``annotations`` with xywh boxes, ``categories``; ``None`` unless asked for).

    ``drop_counts``: annotations (images, for ``image_without_annotations``) left out of the dataset, per reason
    of :data:`pipeline.coco.DROP_REASONS`, and ``num_clipped`` the boxes kept after clipping to their image:
    found by ``load_coco`` for raw COCO, recorded in the manifest by ``prepare`` for Parquet. ``coco``: the
    loaded instances JSON of a raw COCO dataset (for :func:`source_of`, which saves the stream a second read).
    """

    num_images: int
    categories: CategoryMap
    fingerprint: str
    coco_gt: dict[str, Any] | None
    drop_counts: Mapping[str, int] = field(default_factory=dict)
    num_clipped: int = 0
    coco: CocoDataset | None = field(default=None, repr=False, compare=False)


def source_of(spec: DatasetSpec, info: DatasetInfo | None = None) -> Source:
    """The stream source of ``spec``; with the :class:`DatasetInfo` of ``spec``, a raw COCO source carries the
    annotations already loaded (read once on the driver, not once per use)."""
    if spec.parquet is not None:
        return ParquetSource(spec.parquet)
    dataset = info.coco if info is not None else None
    return CocoSource(spec.annotations, spec.images, dataset)  # type: ignore[arg-type]


def drop_summary(infos: Mapping[str, DatasetInfo | None]) -> str:
    """One line for the driver's output of what each named dataset dropped, as ``dhrcnn prepare`` reports it."""
    parts = []
    for name, info in infos.items():
        if info is not None:
            drops = ", ".join(f"{k} {v}" for k, v in info.drop_counts.items() if v) or "none"
            parts.append(f"{name}: {info.num_images} images, dropped: {drops}, clipped boxes: {info.num_clipped}")
    return "datasets: " + "; ".join(parts)


def drop_params(infos: Mapping[str, DatasetInfo | None]) -> dict[str, Any]:
    """MLflow params (nested, for ``Tracker.log_params``) of the drops of each named dataset:
    ``dataset.<name>.dropped.<reason>`` and ``dataset.<name>.clipped_boxes``."""
    return {
        "dataset": {
            name: {"dropped": dict(info.drop_counts), "clipped_boxes": info.num_clipped}
            for name, info in infos.items()
            if info is not None
        }
    }


def dataset_info(spec: DatasetSpec, storage: StorageConfig, *, with_gt: bool = True) -> DatasetInfo:
    """Read the manifest and annotation columns (Parquet) or the instances JSON (raw COCO). ``with_gt=False``: no
    ground truth (a training split: only evaluation needs one), and of a Parquet dataset only its manifest."""
    if spec.parquet is not None:
        manifest = read_manifest(spec.parquet, storage)
        drops, clipped = dict(manifest.drop_counts), int(manifest.counts.get("clipped_boxes", 0))
        if not with_gt:
            num_images = sum(shard.num_rows for shard in manifest.shards)
            return DatasetInfo(num_images, manifest.categories, manifest.fingerprint, None, drops, clipped)
        rows = []
        for uri in manifest.shard_uris(spec.parquet):
            fs, path = resolve(uri, storage)
            rows.extend(pq.read_table(path, filesystem=fs, columns=_GT_COLUMNS).to_pylist())
        records = [
            (r["image_id"], r["file_name"], r["width"], r["height"], r["boxes"], r["labels"], r["iscrowd"], r["area"])
            for r in rows
        ]
        coco_gt = _coco_dict(records, manifest.categories)
        return DatasetInfo(len(records), manifest.categories, manifest.fingerprint, coco_gt, drops, clipped)
    data = load_coco(spec.annotations, storage)  # type: ignore[arg-type]
    drops, clipped = dict(data.drop_counts), data.num_clipped
    if not with_gt:
        return DatasetInfo(len(data.records), data.categories, data.fingerprint, None, drops, clipped, data)
    records = [
        (
            r.image_id,
            r.file_name,
            r.width,
            r.height,
            r.boxes.reshape(-1).tolist(),
            r.labels.tolist(),
            r.iscrowd.tolist(),
            r.area.tolist(),
        )
        for r in data.records
    ]
    coco_gt = _coco_dict(records, data.categories)
    return DatasetInfo(len(records), data.categories, data.fingerprint, coco_gt, drops, clipped, data)


def _coco_dict(records: list[tuple], categories: CategoryMap) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, file_name, width, height, boxes, labels, crowd, area in sorted(records, key=lambda r: r[0]):
        images.append({"id": int(image_id), "file_name": file_name, "width": int(width), "height": int(height)})
        for j, label in enumerate(labels):
            x1, y1, x2, y2 = (float(v) for v in boxes[4 * j : 4 * j + 4])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": categories.category_id_of(int(label)),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area[j]),
                    "iscrowd": int(bool(crowd[j])),
                }
            )
    cats = [{"id": cid, "name": name} for cid, name in zip(categories.category_ids, categories.names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": cats}

"""What a job needs to know about its datasets, read on the driver without images: image count, category
map, fingerprint, and the ground truth in COCO form (original pixels, real category ids) for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from jobs.config import DatasetSpec
from pipeline.categories import CategoryMap
from pipeline.coco import load_coco
from pipeline.manifest import read_manifest
from pipeline.storage import StorageConfig, resolve
from pipeline.stream import CocoSource, ParquetSource, Source

_GT_COLUMNS = ["image_id", "file_name", "width", "height", "boxes", "labels", "iscrowd", "area"]


@dataclass(frozen=True)
class DatasetInfo:
    """``num_images`` rows the stream yields, the category map, a fingerprint of the source, and the COCO
    ground-truth dict (``images``, ``annotations`` with xywh boxes, ``categories``; ``None`` unless asked for)."""

    num_images: int
    categories: CategoryMap
    fingerprint: str
    coco_gt: dict[str, Any] | None


def source_of(spec: DatasetSpec) -> Source:
    if spec.parquet is not None:
        return ParquetSource(spec.parquet)
    return CocoSource(spec.annotations, spec.images)  # type: ignore[arg-type]


def dataset_info(spec: DatasetSpec, storage: StorageConfig, *, with_gt: bool = True) -> DatasetInfo:
    """Read the manifest and annotation columns (Parquet) or the instances JSON (raw COCO). ``with_gt=False``: no
    ground truth (a training split: only evaluation needs one), and of a Parquet dataset only its manifest."""
    if spec.parquet is not None:
        manifest = read_manifest(spec.parquet, storage)
        if not with_gt:
            num_images = sum(shard.num_rows for shard in manifest.shards)
            return DatasetInfo(num_images, manifest.categories, manifest.fingerprint, None)
        rows = []
        for uri in manifest.shard_uris(spec.parquet):
            fs, path = resolve(uri, storage)
            rows.extend(pq.read_table(path, filesystem=fs, columns=_GT_COLUMNS).to_pylist())
        records = [
            (r["image_id"], r["file_name"], r["width"], r["height"], r["boxes"], r["labels"], r["iscrowd"], r["area"])
            for r in rows
        ]
        return DatasetInfo(
            len(records), manifest.categories, manifest.fingerprint, _coco_dict(records, manifest.categories)
        )
    data = load_coco(spec.annotations, storage)  # type: ignore[arg-type]
    if not with_gt:
        return DatasetInfo(len(data.records), data.categories, data.fingerprint, None)
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
    return DatasetInfo(len(records), data.categories, data.fingerprint, _coco_dict(records, data.categories))


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

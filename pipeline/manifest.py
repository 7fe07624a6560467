"""The prepared-dataset contract: the Parquet schema and ``manifest.json``, written last by ``prepare``.

A prepared dataset is a directory (local or ``s3://``)::

    DATASET/manifest.json                  written last; a dataset without it is incomplete
    DATASET/data/<attempt id>/*.parquet    the shards listed in the manifest (paths relative to DATASET)

One Parquet row per image, columns (:data:`PARQUET_SCHEMA`, schema version :data:`SCHEMA_VERSION`):

=========== ================ ====================================================================
column      type             meaning
=========== ================ ====================================================================
image_id    int64            COCO image id
file_name   string           COCO ``file_name``, relative to the source image root
width       int32            COCO ``width`` (image as displayed, i.e. after EXIF orientation)
height      int32            COCO ``height``
image       binary           the original encoded bytes (JPEG/PNG/...), unmodified
boxes       list<float32>    xyxy absolute pixels, clipped to the image, flattened: 4 per box
labels      list<int32>      contiguous labels 1..K (0 = background, never stored); see categories
iscrowd     list<bool>       crowd regions (kept for evaluation, not training positives)
area        list<float32>    COCO ``area`` (segmentation area), or the clipped box area if absent
=========== ================ ====================================================================

Readers must call :func:`read_manifest` and read only the shards it lists (``Manifest.shard_uris``): files
under ``data/`` that the manifest does not list belong to an unfinished or superseded run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.categories import CategoryMap
from pipeline.coco import DatasetError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARQUET_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("iscrowd", pa.list_(pa.bool_()), nullable=False),
        pa.field("area", pa.list_(pa.float32()), nullable=False),
    ]
)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root, e.g. "data/20260101T000000-ab12cd34/xyz_000000-0.parquet"
    num_rows: int
    num_boxes: int


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` records.

    Attributes:
        schema_version: :data:`SCHEMA_VERSION` of the writer.
        source: ``annotations_uri``, ``images_uri``, ``annotations_sha256`` and ``fingerprint`` (see
            :func:`source_fingerprint`).
        options: the options that shaped the content (``drop_empty``, ``skip_missing``, ``skip_corrupt``).
        counts: ``images``, ``annotations`` (boxes stored, crowd included), ``crowd``, ``empty_images``,
            ``source_images``, ``source_annotations``, ``clipped_boxes``, ``missing_images``,
            ``corrupt_images``, ``annotations_of_skipped_images``.
        drop_counts: annotations (or images, for ``image_without_annotations``) dropped, per reason.
        skipped_images: the first few images skipped (``image_id``, ``file_name``, ``reason``, ``detail``).
        categories: category id <-> label <-> name.
        shards: the Parquet files of the dataset.
    """

    schema_version: int
    source: Mapping[str, str]
    options: Mapping[str, bool]
    counts: Mapping[str, int]
    drop_counts: Mapping[str, int]
    skipped_images: tuple[Mapping[str, Any], ...]
    categories: CategoryMap
    shards: tuple[ShardInfo, ...]
    attempt_id: str
    created_at: str
    columns: tuple[str, ...] = field(default=tuple(PARQUET_SCHEMA.names))

    @property
    def fingerprint(self) -> str:
        return self.source["fingerprint"]

    def shard_uris(self, dataset_uri: str) -> list[str]:
        """Full URIs of the shards (what to pass to ``ray.data.read_parquet``)."""
        root = dataset_uri[: -len(MANIFEST_NAME)] if dataset_uri.endswith(MANIFEST_NAME) else dataset_uri
        return [storage.join(root, s.path) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "created_at": self.created_at,
            "attempt_id": self.attempt_id,
            "source": dict(self.source),
            "options": dict(self.options),
            "counts": dict(self.counts),
            "drop_counts": dict(self.drop_counts),
            "skipped_images": [dict(s) for s in self.skipped_images],
            "categories": self.categories.to_dict()["categories"],
            "columns": list(self.columns),
            "shards": [{"path": s.path, "num_rows": s.num_rows, "num_boxes": s.num_boxes} for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            schema_version=int(data["schema_version"]),
            source=dict(data["source"]),
            options=dict(data["options"]),
            counts=dict(data["counts"]),
            drop_counts=dict(data["drop_counts"]),
            skipped_images=tuple(dict(s) for s in data["skipped_images"]),
            categories=CategoryMap.from_dict({"categories": data["categories"]}),
            shards=tuple(ShardInfo(str(s["path"]), int(s["num_rows"]), int(s["num_boxes"])) for s in data["shards"]),
            attempt_id=str(data["attempt_id"]),
            created_at=str(data["created_at"]),
            columns=tuple(data["columns"]),
        )


def manifest_uri(dataset_uri: str) -> str:
    return dataset_uri if dataset_uri.endswith(MANIFEST_NAME) else storage.join(dataset_uri, MANIFEST_NAME)


def source_fingerprint(annotations_sha256: str, images_uri: str) -> str:
    """sha256 of the annotation file's digest and the (normalised) image root URI."""
    return hashlib.sha256(f"{annotations_sha256}\n{images_uri.rstrip('/')}".encode()).hexdigest()


def read_manifest(uri: str, config: storage.StorageConfig | None = None) -> Manifest:
    """The manifest of the prepared dataset at ``uri`` (the dataset directory or its ``manifest.json``).

    Raises:
        DatasetError: no manifest (the dataset was never prepared, or a ``prepare`` run did not finish), an
            unreadable one, or one written by an incompatible schema version.
        pipeline.storage.StorageError: it cannot be read (credentials, bucket, endpoint).
    """
    path = manifest_uri(uri)
    try:
        data = storage.read_bytes(path, config)
    except storage.ObjectNotFoundError:
        raise DatasetError(
            f"{path} does not exist: {uri} is not a prepared dataset, or its `dhrcnn prepare` run did not "
            "finish (the manifest is written last). Run `dhrcnn prepare --annotations ... --images ... "
            f"--out {uri.removesuffix('/' + MANIFEST_NAME)}`."
        ) from None
    try:
        doc = json.loads(data)
        version = int(doc["schema_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a valid manifest ({exc}); re-run `dhrcnn prepare --overwrite`.") from None
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema version {version}, but this code reads version {SCHEMA_VERSION}. Re-run "
            "`dhrcnn prepare --overwrite` with this version."
        )
    try:
        return Manifest.from_dict(doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a valid manifest ({exc}); re-run `dhrcnn prepare --overwrite`.") from None


def write_manifest(dataset_uri: str, manifest: Manifest, config: storage.StorageConfig | None = None) -> str:
    """Write (atomically replace) ``manifest.json``; returns its URI. Call only after every shard is written."""
    path = manifest_uri(dataset_uri)
    storage.write_bytes(path, json.dumps(manifest.to_dict(), indent=2).encode(), config)
    return path

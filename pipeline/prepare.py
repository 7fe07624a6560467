"""``prepare``: a COCO dataset (instances JSON + image root, local or ``s3://``) -> sharded Parquet, with Ray Data.

The output contract (columns, layout, manifest) is documented in :mod:`pipeline.manifest`; one row per image.

How a run goes:

1. The annotations are parsed and validated on the driver (:func:`pipeline.coco.load_coco`); boxes that cannot
   be used are dropped and counted by reason; images without annotations are kept unless ``drop_empty``.
2. If ``OUT/manifest.json`` already records the same source fingerprint (annotation bytes + image root) and
   content options (``drop_empty``, ``skip_missing``, ``skip_corrupt``), and its shards exist, the run is a
   no-op: image objects are assumed immutable, and ``rows_per_shard`` alone does not trigger a rebuild
   (``overwrite`` forces one). A different source or content options need ``overwrite``.
3. The image root is listed once: missing images fail the run (the first few are named) unless
   ``skip_missing`` turns them into counted skips.
4. Ray Data: one block of ``rows_per_shard`` records per shard; each task fetches its images' bytes
   (threaded I/O), checks them (:mod:`pipeline.fetch`) and writes one Parquet file into a fresh attempt
   directory ``OUT/data/<attempt id>/``. Corrupt or wrongly-sized images are reported by the tasks (side files
   under ``OUT/_work/<attempt id>/``); they fail the run unless ``skip_corrupt``.
5. The shards are read back (``image_id`` and ``labels`` columns only) and checked against the expected ids
   and box counts; then ``manifest.json`` is written, last, and superseded or crashed attempts are deleted.

A run that dies before step 5 leaves no manifest (or the previous one, still pointing at its own intact
shards): readers require the manifest, so a crashed run never looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from pipeline import storage
from pipeline.coco import CocoDataset, DatasetError, ImageRecord, load_coco
from pipeline.fetch import ImageProblem, fetch_images, records_to_table
from pipeline.manifest import (
    PARQUET_SCHEMA,
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    manifest_uri,
    read_manifest,
    source_fingerprint,
    write_manifest,
)

__all__ = ["PrepareOptions", "PrepareResult", "prepare_coco", "read_manifest"]
_MAX_LISTED = 5


@dataclass(frozen=True)
class PrepareOptions:
    """``drop_empty``: drop images without (usable) annotations. ``skip_missing`` / ``skip_corrupt``: count and
    skip missing / undecodable or wrongly-sized images instead of failing. ``rows_per_shard``: images per
    Parquet file. ``overwrite``: replace a dataset prepared from another source. ``io_threads``: concurrent
    reads per Ray task."""

    drop_empty: bool = False
    skip_missing: bool = False
    skip_corrupt: bool = False
    rows_per_shard: int = 256
    overwrite: bool = False
    io_threads: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.rows_per_shard <= 10_000:
            raise ValueError(f"rows_per_shard must be in 1..10000, got {self.rows_per_shard}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")

    def content_options(self) -> dict[str, bool]:
        """The options that change what the dataset contains (recorded in, and compared with, the manifest)."""
        return {"drop_empty": self.drop_empty, "skip_missing": self.skip_missing, "skip_corrupt": self.skip_corrupt}


@dataclass(frozen=True)
class PrepareResult:
    dataset_uri: str
    manifest: Manifest
    up_to_date: bool  # True: the dataset was already prepared from this source; nothing was written


def prepare_coco(
    annotations_uri: str,
    images_uri: str,
    out_uri: str,
    options: PrepareOptions | None = None,
    config: storage.StorageConfig | None = None,
) -> PrepareResult:
    """Convert the COCO dataset to Parquet at ``out_uri`` (see the module docstring); Ray is started locally
    (``address="local"``) if it is not running.

    Raises:
        DatasetError: invalid annotations, missing or corrupt images (without the skip options), a different
            dataset already at ``out_uri`` (without ``overwrite``), nothing left to write.
        pipeline.storage.StorageError: a source or the destination cannot be reached.
    """
    options = options or PrepareOptions()
    coco = load_coco(annotations_uri, config, drop_images_without_annotations=options.drop_empty)
    fingerprint = source_fingerprint(coco.fingerprint, images_uri)
    existing = _existing_manifest(out_uri, options, config)
    if existing is not None:
        same = existing.fingerprint == fingerprint and dict(existing.options) == options.content_options()
        if same and not options.overwrite and _shards_present(out_uri, existing, config):
            return PrepareResult(out_uri, existing, up_to_date=True)
        if not same and not options.overwrite:
            raise DatasetError(
                f"{out_uri} already holds a dataset prepared from {existing.source['annotations_uri']} with "
                f"options {dict(existing.options)} (fingerprint {existing.fingerprint[:12]}); this source or "
                "these options differ. Choose another --out, or pass --overwrite to replace it."
            )

    records, skipped = _without_missing(coco, images_uri, options, config)
    if not records:
        raise DatasetError(f"{annotations_uri}: no image left to write to {out_uri} (all dropped or skipped)")
    attempt = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    data_uri = storage.join(out_uri, "data", attempt)
    work_uri = storage.join(out_uri, "_work", attempt)
    try:
        _write_shards(records, images_uri, data_uri, work_uri, options, config)
        problems = _read_problems(work_uri, config)
        _check_problems(problems, annotations_uri, images_uri, options)
        skipped += problems
        shards = _verify_shards(out_uri, data_uri, records, skipped, config)
        manifest = _manifest(coco, images_uri, fingerprint, options, skipped, records, shards, attempt)
        write_manifest(out_uri, manifest, config)
    except BaseException:
        _delete_quietly([data_uri, work_uri], config)
        raise
    _delete_quietly([work_uri, *_other_attempts(out_uri, attempt, config)], config)
    return PrepareResult(out_uri, manifest, up_to_date=False)


def _existing_manifest(out_uri: str, options: PrepareOptions, config: storage.StorageConfig | None) -> Manifest | None:
    try:
        return read_manifest(out_uri, config)
    except DatasetError:
        if options.overwrite or not storage.exists(manifest_uri(out_uri), config):
            return None
        raise  # present but unreadable or of another schema version: replace it only if asked to


def _shards_present(out_uri: str, manifest: Manifest, config: storage.StorageConfig | None) -> bool:
    present = set(storage.list_files(storage.join(out_uri, "data"), config, suffixes=(".parquet",)))
    return set(manifest.shard_uris(out_uri)) <= present


def _without_missing(
    coco: CocoDataset, images_uri: str, options: PrepareOptions, config: storage.StorageConfig | None
) -> tuple[list[ImageRecord], list[ImageProblem]]:
    """Records whose image object exists (one listing of the image root), and the missing ones as problems."""
    root = images_uri.rstrip("/")
    present = {uri[len(root) + 1 :] for uri in storage.list_files(root, config)}
    missing = [r for r in coco.records if r.file_name not in present]
    if missing and not options.skip_missing:
        listed = ", ".join(f"image id {r.image_id} ({r.file_name})" for r in missing[:_MAX_LISTED])
        raise DatasetError(
            f"{coco.source_uri}: {len(missing)} of {len(coco.records)} images are missing under {images_uri}: "
            f"{listed}{', ...' if len(missing) > _MAX_LISTED else ''}. Check --images (the root that the "
            "file names are relative to), upload the images, or pass --skip-missing to skip and count them."
        )
    problems = [ImageProblem(r.image_id, r.file_name, "missing", "no such object") for r in missing]
    missing_ids = {r.image_id for r in missing}
    return [r for r in coco.records if r.image_id not in missing_ids], problems


def _write_shards(
    records: Sequence[ImageRecord],
    images_uri: str,
    data_uri: str,
    work_uri: str,
    options: PrepareOptions,
    config: storage.StorageConfig | None,
) -> None:
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    n_shards = math.ceil(len(records) / options.rows_per_shard)
    per_shard = math.ceil(len(records) / n_shards)
    blocks = [records_to_table(records[i : i + per_shard]) for i in range(0, len(records), per_shard)]
    fs, path = storage.resolve(data_uri, config)
    ds = ray.data.from_arrow(blocks).map_batches(
        _fetch_udf,
        batch_size=None,  # one block = one shard
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={"images_uri": images_uri, "work_uri": work_uri, "config": config, "io_threads": options.io_threads},
    )
    ds.write_parquet(
        path,
        filesystem=fs,
        schema=PARQUET_SCHEMA,
        max_rows_per_file=options.rows_per_shard,
        compression={name: ("none" if name == "image" else "zstd") for name in PARQUET_SCHEMA.names},
        use_dictionary=["file_name"],
        ray_remote_args={"num_cpus": 1},
    )


def _fetch_udf(
    batch: pa.Table, *, images_uri: str, work_uri: str, config: storage.StorageConfig | None, io_threads: int
) -> pa.Table:
    """Ray task body: fetch and check the images; report problems in a side file; return the good rows."""
    table, problems = fetch_images(batch, images_uri, config, io_threads=io_threads)
    if problems:
        report = json.dumps([p.to_dict() for p in problems]).encode()
        storage.write_bytes(storage.join(work_uri, f"problems-{uuid.uuid4().hex}.json"), report, config)
    return table.select(PARQUET_SCHEMA.names).cast(PARQUET_SCHEMA)


def _read_problems(work_uri: str, config: storage.StorageConfig | None) -> list[ImageProblem]:
    problems = []
    for uri in storage.list_files(work_uri, config, suffixes=(".json",)):
        problems += [ImageProblem(**p) for p in json.loads(storage.read_bytes(uri, config))]
    return sorted(problems, key=lambda p: p.image_id)


def _check_problems(
    problems: list[ImageProblem], annotations_uri: str, images_uri: str, options: PrepareOptions
) -> None:
    fatal = [p for p in problems if not (options.skip_missing if p.reason == "missing" else options.skip_corrupt)]
    if fatal:
        listed = "; ".join(
            f"image id {p.image_id} ({p.file_name}): {p.reason}: {p.detail}" for p in fatal[:_MAX_LISTED]
        )
        flag = "--skip-missing" if all(p.reason == "missing" for p in fatal) else "--skip-corrupt"
        raise DatasetError(
            f"{annotations_uri}: {len(fatal)} images under {images_uri} cannot be used: {listed}"
            f"{'; ...' if len(fatal) > _MAX_LISTED else ''}. Fix or remove them, or pass {flag} to skip and "
            "count them."
        )


def _verify_shards(
    out_uri: str,
    data_uri: str,
    records: Sequence[ImageRecord],
    skipped: Sequence[ImageProblem],
    config: storage.StorageConfig | None,
) -> list[ShardInfo]:
    """Read back ``image_id`` and ``labels`` of every shard; they must hold exactly the expected images and boxes."""
    skipped_ids = {p.image_id for p in skipped}
    expected = {r.image_id: r.num_boxes for r in records if r.image_id not in skipped_ids}
    fs, _ = storage.resolve(data_uri, config)
    shards, seen = [], []
    n_boxes = 0
    for uri in storage.list_files(data_uri, config, suffixes=(".parquet",)):
        table = pq.read_table(storage.resolve(uri, config)[1], columns=["image_id", "labels"], filesystem=fs)
        if table.num_rows == 0:
            continue
        boxes = sum(len(v) for v in table.column("labels").to_pylist())
        seen += table.column("image_id").to_pylist()
        n_boxes += boxes
        shards.append(ShardInfo(uri[len(out_uri.rstrip("/")) + 1 :], table.num_rows, boxes))
    if not expected:
        raise DatasetError(f"{data_uri}: every image was skipped; there is nothing to write")
    if sorted(seen) != sorted(expected) or n_boxes != sum(expected.values()):
        raise DatasetError(
            f"{data_uri}: the written shards hold {len(seen)} rows ({len(set(seen))} distinct image ids) and "
            f"{n_boxes} boxes; expected {len(expected)} images and {sum(expected.values())} boxes. The write "
            "was incomplete; run prepare again."
        )
    return shards


def _manifest(
    coco: CocoDataset,
    images_uri: str,
    fingerprint: str,
    options: PrepareOptions,
    skipped: Sequence[ImageProblem],
    records: Sequence[ImageRecord],
    shards: Sequence[ShardInfo],
    attempt: str,
) -> Manifest:
    skipped_ids = {p.image_id for p in skipped}
    kept = [r for r in records if r.image_id not in skipped_ids]
    skipped_boxes = sum(r.num_boxes for r in coco.records if r.image_id in skipped_ids)
    counts: dict[str, Any] = {
        "images": len(kept),
        "annotations": sum(r.num_boxes for r in kept),
        "crowd": int(sum(r.iscrowd.sum() for r in kept)),
        "empty_images": sum(r.num_boxes == 0 for r in kept),
        "source_images": coco.num_source_images,
        "source_annotations": coco.num_source_annotations,
        "clipped_boxes": coco.num_clipped,
        "missing_images": sum(p.reason == "missing" for p in skipped),
        "corrupt_images": sum(p.reason != "missing" for p in skipped),
        "annotations_of_skipped_images": skipped_boxes,
    }
    return Manifest(
        schema_version=SCHEMA_VERSION,
        source={
            "annotations_uri": coco.source_uri,
            "images_uri": images_uri,
            "annotations_sha256": coco.fingerprint,
            "fingerprint": fingerprint,
        },
        options=options.content_options(),
        counts=counts,
        drop_counts=dict(coco.drop_counts),
        skipped_images=tuple(p.to_dict() for p in skipped[:50]),
        categories=coco.categories,
        shards=tuple(shards),
        attempt_id=attempt,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _other_attempts(out_uri: str, attempt: str, config: storage.StorageConfig | None) -> list[str]:
    """Attempt directories under ``data/`` and ``_work/`` other than ``attempt`` (superseded or crashed runs)."""
    found = set()
    for sub in ("data", "_work"):
        root = storage.join(out_uri, sub)
        for uri in storage.list_files(root, config):
            name = uri[len(root) + 1 :].split("/", 1)[0]
            if name != attempt:
                found.add(storage.join(root, name))
    return sorted(found)


def _delete_quietly(uris: Sequence[str], config: storage.StorageConfig | None) -> None:
    for uri in uris:
        # best effort: leftovers are never listed in a manifest, and the next successful run removes them
        with contextlib.suppress(storage.StorageError):
            storage.delete_tree(uri, config)

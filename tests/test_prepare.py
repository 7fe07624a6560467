"""``prepare``: COCO on the local S3 server -> sharded Parquet + manifest with Ray Data; bad inputs; crashes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from PIL import Image

from jobs.cli import main
from jobs.local_s3 import S3Server
from pipeline import storage
from pipeline.coco import DatasetError, load_coco
from pipeline.fetch import check_image
from pipeline.manifest import PARQUET_SCHEMA, read_manifest
from pipeline.prepare import PrepareOptions, prepare_coco
from pipeline.synth import SynthConfig, write_synth

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Source:
    annotations: str
    images: str
    doc: dict


def _source(root: str, n: int = 12, seed: int = 0) -> Source:
    """A synthetic train split under ``root`` (some images without objects)."""
    write_synth(root, SynthConfig(num_images=n, seed=seed, val_fraction=0.25, empty_fraction=0.3))
    annotations = storage.join(root, "annotations", "instances_train.json")
    return Source(annotations, storage.join(root, "images", "train"), json.loads(storage.read_bytes(annotations)))


@pytest.fixture(scope="module")
def source(ray_cluster: S3Server) -> Source:
    return _source(ray_cluster.create_bucket() + "/shapes")


def _rows(out: str) -> list[dict]:
    manifest = read_manifest(out)
    rows = []
    for uri in manifest.shard_uris(out):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        assert table.schema.equals(PARQUET_SCHEMA, check_metadata=False), table.schema
        rows += table.to_pylist()
    return sorted(rows, key=lambda r: r["image_id"])


def test_round_trip_rerun_and_overwrite(source: Source, ray_cluster: S3Server) -> None:
    out = ray_cluster.create_bucket() + "/prepared/train"
    result = prepare_coco(source.annotations, source.images, out, PrepareOptions(rows_per_shard=4))
    m = result.manifest
    coco = load_coco(source.annotations)
    n_empty = sum(r.num_boxes == 0 for r in coco.records)
    assert not result.up_to_date and 0 < n_empty < len(coco.records)
    assert m.counts["images"] == m.counts["source_images"] == len(source.doc["images"]) == 9
    assert m.counts["annotations"] == m.counts["source_annotations"] == len(source.doc["annotations"])
    assert m.counts["empty_images"] == n_empty and sum(m.drop_counts.values()) == 0
    assert m.categories == coco.categories and [s.num_rows for s in m.shards] == [3, 3, 3]
    assert read_manifest(out) == m

    rows = _rows(out)
    assert [r["image_id"] for r in rows] == [r.image_id for r in coco.records]
    for row, rec in zip(rows, coco.records, strict=True):
        assert (row["file_name"], row["width"], row["height"]) == (rec.file_name, rec.width, rec.height)
        np.testing.assert_array_equal(np.array(row["boxes"], np.float32).reshape(-1, 4), rec.boxes)
        assert row["labels"] == rec.labels.tolist() and row["iscrowd"] == rec.iscrowd.tolist()
        np.testing.assert_array_equal(np.array(row["area"], np.float32), rec.area)
        assert row["image"] == storage.read_bytes(storage.join(source.images, rec.file_name))
    fs, _ = storage.resolve(out)
    assert ray.data.read_parquet(m.shard_uris(out), filesystem=fs).count() == 9  # what the stream reads

    manifest_bytes = storage.read_bytes(storage.join(out, "manifest.json"))
    files = storage.list_files(out)
    again = prepare_coco(source.annotations, source.images, out, PrepareOptions(rows_per_shard=4))
    assert again.up_to_date and again.manifest == m  # a rerun on the same source is a no-op
    assert storage.read_bytes(storage.join(out, "manifest.json")) == manifest_bytes
    assert storage.list_files(out) == files

    with pytest.raises(DatasetError, match=r"already holds a dataset .* pass --overwrite"):
        prepare_coco(source.annotations, source.images, out, PrepareOptions(drop_empty=True))
    replaced = prepare_coco(source.annotations, source.images, out, PrepareOptions(drop_empty=True, overwrite=True))
    r = replaced.manifest
    assert r.attempt_id != m.attempt_id and r.counts["images"] == 9 - n_empty and r.counts["empty_images"] == 0
    assert r.drop_counts["image_without_annotations"] == n_empty
    assert r.counts["annotations"] == m.counts["annotations"]
    # the superseded attempt is gone; only the manifest and its shards remain
    assert storage.list_files(out) == sorted([storage.join(out, "manifest.json"), *r.shard_uris(out)])


def test_crash_between_shards_and_manifest_leaves_no_dataset(source: Source, ray_cluster: S3Server) -> None:
    out = ray_cluster.create_bucket() + "/prepared"
    crash = (
        "import os, sys, ray\n"
        "import pipeline.prepare as p\n"
        "ray.init(address=sys.argv[1])\n"
        "def die(*args, **kwargs):\n"
        "    os._exit(3)  # killed after the shards, before the manifest\n"
        "p.write_manifest = die\n"
        "p.prepare_coco(sys.argv[2], sys.argv[3], sys.argv[4])\n"
    )
    gcs = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", crash, gcs, source.annotations, source.images, out],
        capture_output=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr.decode()[-3000:]
    leftovers = storage.list_files(out, suffixes=(".parquet",))
    assert leftovers and not storage.exists(storage.join(out, "manifest.json"))
    with pytest.raises(DatasetError, match="did not finish"):
        read_manifest(out)

    result = prepare_coco(source.annotations, source.images, out)  # the next run completes and cleans up
    assert not result.up_to_date and result.manifest.counts["images"] == 9
    assert storage.list_files(out) == sorted([storage.join(out, "manifest.json"), *result.manifest.shard_uris(out)])
    assert not set(leftovers) & set(result.manifest.shard_uris(out))


def test_missing_images_fail_or_are_counted(ray_cluster: S3Server) -> None:
    bucket = ray_cluster.create_bucket()
    src = _source(bucket + "/src", n=8, seed=3)
    doc = src.doc
    ghost = doc["images"][1]
    ghost["file_name"] = "ghost.jpg"  # listed in the JSON, no such object
    ghost_boxes = sum(a["image_id"] == ghost["id"] for a in doc["annotations"])
    storage.write_bytes(src.annotations, json.dumps(doc).encode())
    out = bucket + "/prepared"

    with pytest.raises(
        DatasetError, match=rf"1 of 6 images are missing .*image id {ghost['id']} \(ghost\.jpg\).*--skip-missing"
    ):
        prepare_coco(src.annotations, src.images, out)
    assert storage.list_files(out) == []

    # explicit credentials: the tasks get a pickle without them and use the workers' environment
    explicit = storage.StorageConfig(
        access_key_id=ray_cluster.access_key_id, secret_access_key=ray_cluster.secret_access_key
    )
    m = prepare_coco(src.annotations, src.images, out, PrepareOptions(skip_missing=True), explicit).manifest
    assert m.counts["images"] == 5 and m.counts["missing_images"] == 1
    assert m.counts["annotations"] == len(doc["annotations"]) - ghost_boxes
    assert m.counts["annotations_of_skipped_images"] == ghost_boxes
    assert [(s["image_id"], s["reason"]) for s in m.skipped_images] == [(ghost["id"], "missing")]


def test_corrupt_images_fail_or_are_counted(ray_cluster: S3Server) -> None:
    bucket = ray_cluster.create_bucket()
    src = _source(bucket + "/src", n=8, seed=4)
    doc = src.doc
    garbage, truncated, resized = doc["images"][0], doc["images"][2], doc["images"][4]
    storage.write_bytes(storage.join(src.images, garbage["file_name"]), b"\xff\xd8\xff\xe0 this is not a JPEG")
    good = storage.read_bytes(storage.join(src.images, truncated["file_name"]))
    storage.write_bytes(storage.join(src.images, truncated["file_name"]), good[: len(good) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (resized["width"] + 7, resized["height"])).save(buf, format="JPEG")
    storage.write_bytes(storage.join(src.images, resized["file_name"]), buf.getvalue())
    out = bucket + "/prepared"

    with pytest.raises(DatasetError, match=r"3 images under .* cannot be used") as info:
        prepare_coco(src.annotations, src.images, out, PrepareOptions(rows_per_shard=2))
    message = str(info.value)
    for img, reason in ((garbage, "corrupt"), (truncated, "corrupt"), (resized, "size_mismatch")):
        assert f"image id {img['id']} ({img['file_name']}): {reason}" in message
    assert "--skip-corrupt" in message
    assert storage.list_files(out) == []  # the failed attempt is removed, nothing looks complete

    m = prepare_coco(src.annotations, src.images, out, PrepareOptions(skip_corrupt=True, rows_per_shard=2)).manifest
    assert m.counts["images"] == 3 and m.counts["corrupt_images"] == 3
    assert sorted((s["image_id"], s["reason"]) for s in m.skipped_images) == sorted(
        [(garbage["id"], "corrupt"), (truncated["id"], "corrupt"), (resized["id"], "size_mismatch")]
    )
    assert {r["image_id"] for r in _rows(out)}.isdisjoint({garbage["id"], truncated["id"], resized["id"]})


def _encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def test_check_image_reads_headers_and_respects_exif_orientation() -> None:
    rgb = Image.new("RGB", (40, 30), (10, 20, 30))
    assert check_image(_encoded(rgb, "JPEG"), 40, 30) is None
    assert check_image(_encoded(Image.new("RGB", (1, 1)), "PNG"), 1, 1) is None
    assert check_image(_encoded(Image.new("CMYK", (40, 30)), "JPEG"), 40, 30) is None
    assert check_image(_encoded(Image.new("I;16", (40, 30)), "PNG"), 40, 30) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 30x40, which is what COCO annotates
    rotated = _encoded(rgb, "JPEG", exif=exif.tobytes())
    assert check_image(rotated, 30, 40) is None
    reason, detail = check_image(rotated, 40, 30)  # the stored size is not what the stream will decode
    assert reason == "size_mismatch" and "30x40 as displayed" in detail and "annotated 40x30" in detail
    data = _encoded(rgb, "JPEG")
    assert check_image(data[: len(data) // 2], 40, 30)[0] == "corrupt"  # truncated
    assert check_image(b"GIF89a garbage", 40, 30)[0] == "corrupt"


def test_cli_on_local_paths(ray_cluster: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "src"), "--images", "5", "--seed", "1"]) == 0
    args = [
        "prepare",
        "--annotations", str(tmp_path / "src/annotations/instances_train.json"),
        "--images", str(tmp_path / "src/images/train"),
        "--out", str(tmp_path / "prepared"),
    ]  # fmt: skip
    assert main(args) == 0
    assert "4 images" in capsys.readouterr().out
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "prepared")).counts["images"] == 4
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "prepared" / "data").rglob("*.parquet")))
    assert table.num_rows == 4

    bad = [*args[:2], str(tmp_path / "nope.json"), *args[3:]]
    assert main(bad) == 1
    assert "error: " in capsys.readouterr().err

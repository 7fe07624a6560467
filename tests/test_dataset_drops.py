"""jobs.datasets on the driver: what the annotations lost (raw COCO and Parquet) reaches ``DatasetInfo``, the
driver's output and the job's MLflow run; a raw COCO source is read once for ``dataset_info`` and the stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from jobs.config import DatasetSpec, resolve_job_config
from jobs.datasets import DatasetInfo, dataset_info, drop_params, drop_summary, source_of
from pipeline import storage
from pipeline.categories import CategoryMap
from pipeline.manifest import SCHEMA_VERSION, Manifest, write_manifest
from pipeline.storage import StorageConfig

CATS = CategoryMap.from_pairs([(1, "cat"), (3, "dog")])


def _coco(tmp_path: Path) -> DatasetSpec:
    doc = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 60, "height": 60},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [120, 10, 5, 5]},  # right of the image
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [50, 50, 20, 20]},  # clipped to 10x10
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3]},  # not a box
            {"id": 14, "image_id": 2, "category_id": 1, "bbox": [5, 5, 30, 30], "iscrowd": 1},  # kept, flagged
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return DatasetSpec(annotations=str(path), images=str(tmp_path / "images"))


@pytest.mark.parametrize("with_gt", [False, True])
def test_raw_coco_drop_counts_are_on_the_dataset_info(tmp_path: Path, with_gt: bool) -> None:
    info = dataset_info(_coco(tmp_path), StorageConfig(), with_gt=with_gt)
    assert info.num_images == 2 and info.num_clipped == 1
    assert {k: v for k, v in info.drop_counts.items() if v} == {"bbox_outside_image": 1, "bbox_wrong_length": 1}
    assert info.coco is not None and info.coco.num_annotations == 3


def test_parquet_drop_counts_come_from_the_manifest(tmp_path: Path) -> None:
    drops = {"bbox_outside_image": 4, "bbox_smaller_than_1px": 0, "image_without_annotations": 2}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        source={"annotations_uri": "a.json", "images_uri": "img", "annotations_sha256": "x", "fingerprint": "fp"},
        options={"drop_empty": True, "skip_missing": False, "skip_corrupt": False},
        counts={"images": 3, "clipped_boxes": 5},
        drop_counts=drops,
        skipped_images=(),
        categories=CATS,
        shards=(),
        attempt_id="a",
        created_at="now",
    )
    write_manifest(str(tmp_path), manifest)
    info = dataset_info(DatasetSpec(parquet=str(tmp_path)), StorageConfig(), with_gt=False)
    assert dict(info.drop_counts) == drops and info.num_clipped == 5 and info.coco is None


def test_the_driver_line_and_the_params_name_each_split() -> None:
    train = DatasetInfo(10, CATS, "fp", None, {"bbox_outside_image": 2, "bbox_not_finite": 0}, 3)
    val = DatasetInfo(4, CATS, "fp", None, {"bbox_outside_image": 0}, 0)
    line = drop_summary({"train": train, "val": val})
    assert "\n" not in line
    assert "train: 10 images, dropped: bbox_outside_image 2, clipped boxes: 3" in line
    assert "val: 4 images, dropped: none, clipped boxes: 0" in line
    params = drop_params({"train": train, "val": None})
    assert params == {"dataset": {"train": {"dropped": dict(train.drop_counts), "clipped_boxes": 3}}}


def test_drop_counts_reach_the_jobs_mlflow_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from jobs.mlflow.tracking import ensure_tracking_store
    from jobs.train.job import job_run_id

    spec = _coco(tmp_path)
    job = resolve_job_config(
        {
            "model": {"preset": "tiny", "num_classes": 2},
            "data": {"train": {"annotations": spec.annotations, "images": spec.images}},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": None},
            "run": {"name": "drops", "storage_path": str(tmp_path / "runs")},
        }
    )
    tracking = ensure_tracking_store(job.tracking)
    info = dataset_info(spec, StorageConfig(), with_gt=False)
    run_dir = str(tmp_path / "runs" / "drops")
    run_id = job_run_id(tracking, run_dir, StorageConfig(), job, info.fingerprint, params=drop_params({"train": info}))
    params = MlflowClient(tracking.tracking_uri).get_run(run_id).data.params
    assert params["dataset.train.dropped.bbox_outside_image"] == "1"
    assert params["dataset.train.dropped.bbox_wrong_length"] == "1"
    assert params["dataset.train.dropped.bbox_smaller_than_1px"] == "0"
    assert params["dataset.train.clipped_boxes"] == "1"
    assert params["model.num_classes"] == "2"  # beside the config's own params


class _FakeDataset:
    """What ``ray.data.from_arrow`` returns, without Ray: records the tables, returns itself on each step."""

    def __init__(self, tables: list[pa.Table]) -> None:
        self.num_rows = sum(t.num_rows for t in tables)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


def test_dataset_info_and_the_stream_read_the_annotations_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.data

    from pipeline.stream import StreamConfig, eval_dataset

    reads: list[str] = []
    read_chunks = storage.read_chunks

    def counted(uri: str, *args: Any, **kwargs: Any):
        reads.append(uri)
        yield from read_chunks(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_chunks", counted)
    monkeypatch.setattr(ray.data, "from_arrow", _FakeDataset)
    spec = _coco(tmp_path)
    info = dataset_info(spec, StorageConfig())
    stream = eval_dataset(source_of(spec, info), StorageConfig(), StreamConfig())
    assert reads == [spec.annotations] and stream.num_rows == info.num_images == 2
    eval_dataset(source_of(spec), StorageConfig(), StreamConfig())  # without the info: the stream reads it
    assert reads == [spec.annotations] * 2

"""pipeline.stream end to end on the local S3 server: COCO -> Parquet -> Ray Data -> collated batches.

Every box that comes out, mapped back through ``unscale_boxes``, must equal the source annotation to 1e-3 px.
Ray runs in-process (``address="local"``, 2 CPUs); the AWS variables point at the moto server before Ray
starts, so the workers inherit them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from jobs.local_s3 import S3Server
from pipeline.coco import ImageRecord, load_coco
from pipeline.collate import unscale_boxes
from pipeline.prepare import PrepareOptions, prepare_coco
from pipeline.storage import StorageConfig, join, write_bytes
from pipeline.stream import (
    CocoSource,
    IncompleteDatasetError,
    ParquetSource,
    StreamConfig,
    eval_dataset,
    iter_eval_batches,
    iter_train_batches,
    train_dataset,
)
from pipeline.synth import SynthConfig, write_synth
from pipeline.transforms import AugmentConfig, ResizeConfig, rescaled_size

SMALL = ResizeConfig(train_min_sizes=(48, 64, 80), test_min_size=64, max_size=128)
CONFIG = StreamConfig(augment=AugmentConfig(resize=SMALL), seed=3, rows_per_task=4)

# (width, height, boxes as COCO [x, y, w, h], iscrowd flags): landscape and portrait images, crowd regions,
# images without boxes, a box touching the border, a 1x1 image, and (EXIF_ROTATED) a JPEG stored landscape
# with EXIF orientation 6, displayed (and annotated) portrait.
EXIF_ROTATED = 1
MIXED = [
    (64, 48, [[4, 4, 20, 10], [30, 10, 34, 38]], [0, 0]),
    (40, 72, [[1, 2, 30, 40]], [0]),
    (80, 40, [[0, 0, 80, 40], [10, 5, 20, 20]], [1, 0]),  # full-image crowd region
    (36, 60, [], []),
    (50, 50, [[10.5, 12.25, 7.75, 9.5]], [0]),
    (30, 70, [[2, 2, 10, 10], [12, 30, 15, 30]], [0, 1]),
    (72, 54, [[60, 40, 12, 14]], [0]),
    (1, 1, [], []),
]


def _write_mixed_coco(root: str) -> tuple[str, str]:
    """Write :data:`MIXED` as a COCO dataset (PNG images with random pixels) under ``root``."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (w, h, boxes, crowd) in enumerate(MIXED):
        buf = io.BytesIO()
        if i == EXIF_ROTATED:
            stored = Image.fromarray(rng.integers(0, 256, (w, h, 3), dtype=np.uint8))  # stored h x w
            exif = stored.getexif()
            exif[0x0112] = 6  # rotate 90 degrees clockwise for display
            stored.save(buf, "JPEG", exif=exif.tobytes())
            name = f"{i:03d}.jpg"
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
            name = f"{i:03d}.png"
        write_bytes(join(root, "images", name), buf.getvalue())
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        for box, is_crowd in zip(boxes, crowd, strict=True):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 5 + len(annotations) % 2,
                 "bbox": box, "area": box[2] * box[3], "iscrowd": is_crowd}
            )  # fmt: skip
    doc = {"images": images, "annotations": annotations, "categories": [{"id": 5, "name": "a"}, {"id": 6, "name": "b"}]}
    write_bytes(join(root, "annotations.json"), json.dumps(doc).encode())
    return join(root, "annotations.json"), join(root, "images")


@pytest.fixture(scope="module")
def synth_parquet(ray_cluster: S3Server) -> tuple[str, dict[int, ImageRecord]]:
    """``dhrcnn synth`` (12 images) then ``prepare`` of its train split, on S3."""
    root = ray_cluster.create_bucket()
    splits = {s.split: s for s in write_synth(join(root, "synth"), SynthConfig(num_images=12, seed=5))}
    train = splits["train"]
    out = join(root, "parquet")
    _prepare(train.annotations_uri, train.images_uri, out)
    records = {r.image_id: r for r in load_coco(train.annotations_uri).records}
    return out, records


@pytest.fixture(scope="module")
def mixed(ray_cluster: S3Server) -> tuple[str, str, str, dict[int, ImageRecord]]:
    """:data:`MIXED` on S3 as raw COCO and as prepared Parquet: ``(annotations, images, parquet, records)``."""
    root = ray_cluster.create_bucket()
    annotations_uri, images_uri = _write_mixed_coco(join(root, "coco"))
    out = join(root, "parquet")
    _prepare(annotations_uri, images_uri, out)
    return annotations_uri, images_uri, out, {r.image_id: r for r in load_coco(annotations_uri).records}


def _prepare(annotations_uri: str, images_uri: str, out: str) -> None:
    """``dhrcnn prepare`` with 4 images per shard, so that the file shuffle has several files to permute."""
    prepare_coco(annotations_uri, images_uri, out, PrepareOptions(rows_per_shard=4))


def _check_against_source(targets: list[dict], records: dict[int, ImageRecord], *, crowd: bool) -> None:
    for t in targets:
        record = records[int(t["image_id"])]
        keep = np.ones(record.num_boxes, bool) if crowd else ~record.iscrowd
        assert t["orig_size"].tolist() == [record.height, record.width]
        np.testing.assert_allclose(unscale_boxes(t["boxes"], t).numpy(), record.boxes[keep], atol=1e-3, rtol=0)
        np.testing.assert_array_equal(t["labels"].numpy(), record.labels[keep])
        assert (t["labels"] >= 1).all()


@pytest.mark.timeout(120)
def test_synth_prepare_stream_boxes_map_back_to_the_annotations(synth_parquet: tuple) -> None:
    uri, records = synth_parquet
    seen: list[int] = []
    flips = set()
    for images, targets in iter_train_batches(train_dataset(ParquetSource(uri), StorageConfig(), CONFIG),
                                              batch_size=3, epoch=0):  # fmt: skip
        _check_against_source(targets, records, crowd=False)
        for image, t in zip(images, targets, strict=True):
            record = records[int(t["image_id"])]
            assert image.dtype.is_floating_point is False and image.shape[0] == 3
            assert min(image.shape[1:]) in SMALL.train_min_sizes or max(image.shape[1:]) == SMALL.max_size
            sx, sy = t["scale_factor"].tolist()
            assert image.shape[2] == round(record.width * sx) and image.shape[1] == round(record.height * sy)
            flips.add(bool(t["flipped"]))
            seen.append(int(t["image_id"]))
    assert sorted(seen) == sorted(records)
    assert flips == {True, False}


@pytest.mark.timeout(120)
def test_training_drops_crowd_and_groups_batches_by_orientation(mixed: tuple) -> None:
    _, _, uri, records = mixed
    seen: list[int] = []
    for images, targets in iter_train_batches(train_dataset(ParquetSource(uri), StorageConfig(), CONFIG),
                                              batch_size=2, epoch=0):  # fmt: skip
        assert len({img.shape[2] >= img.shape[1] for img in images}) == 1, "mixed orientations in one batch"
        _check_against_source(targets, records, crowd=False)
        seen += [int(t["image_id"]) for t in targets]
    assert sorted(seen) == sorted(records)


@pytest.mark.timeout(60)
def test_images_without_training_boxes_can_be_dropped(mixed: tuple) -> None:
    _, _, uri, records = mixed
    config = dataclasses.replace(CONFIG, drop_images_without_boxes=True)
    batches = iter_train_batches(train_dataset(ParquetSource(uri), config=config), batch_size=4, epoch=0)
    seen = {int(t["image_id"]) for _, targets in batches for t in targets}
    assert seen == {i for i, r in records.items() if (~r.iscrowd).any()}
    assert len(seen) == len(records) - 2  # the two images without any box


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source_kind", ["parquet", "coco"])
def test_eval_stream_carries_ids_scales_and_crowd(mixed: tuple, source_kind: str) -> None:
    annotations_uri, images_uri, uri, records = mixed
    source = ParquetSource(uri) if source_kind == "parquet" else CocoSource(annotations_uri, images_uri)
    seen = []
    for images, targets in iter_eval_batches(eval_dataset(source, StorageConfig(), CONFIG), batch_size=3):
        _check_against_source(targets, records, crowd=True)
        for image, t in zip(images, targets, strict=True):
            record = records[int(t["image_id"])]
            w, h = rescaled_size(record.width, record.height, SMALL.test_min_size, SMALL.max_size)
            assert tuple(image.shape) == (3, h, w)
            np.testing.assert_allclose(t["scale_factor"].numpy(), [w / record.width, h / record.height], rtol=1e-6)
            assert not bool(t["flipped"])
            np.testing.assert_array_equal(t["iscrowd"].numpy(), record.iscrowd)
            seen.append(int(t["image_id"]))
    assert sorted(seen) == sorted(records)


def _epoch_log(uri: str, config: StreamConfig, epochs: range | list[int]) -> list[list[tuple[int, bool, int]]]:
    """Per epoch: ``(image_id, flipped, resized height)`` in delivery order, each epoch's dataset built anew."""
    return [
        [(int(t["image_id"]), bool(t["flipped"]), int(img.shape[1]))
         for images, targets in iter_train_batches(train_dataset(ParquetSource(uri), StorageConfig(), config, epoch=e),
                                                   batch_size=2, epoch=e, seed=config.seed)
         for img, t in zip(images, targets, strict=True)]
        for e in epochs
    ]  # fmt: skip


@pytest.mark.timeout(120)
def test_seeded_shuffle_is_reproducible_and_differs_between_epochs(mixed: tuple) -> None:
    uri = mixed[2]
    config = StreamConfig(augment=AugmentConfig(resize=SMALL), seed=11, rows_per_task=2)
    first, again = _epoch_log(uri, config, range(2)), _epoch_log(uri, config, range(2))
    assert first == again  # same seed: same order, same scales, same flips
    assert sorted(first[0]) != sorted(first[1])  # per-image augmentation changes with the epoch
    assert [i for i, _, _ in first[0]] != [i for i, _, _ in first[1]]  # so does the order
    other = _epoch_log(uri, StreamConfig(augment=AugmentConfig(resize=SMALL), seed=12), range(1))
    assert other[0] != first[0]


@pytest.mark.timeout(120)
def test_an_epoch_depends_on_the_epoch_not_on_how_many_ran_before(mixed: tuple) -> None:
    """A resumed driver builds epoch 1 first: it must be epoch 1 of an uninterrupted run (order, scales, flips),
    not that run's epoch 0 (the key was once Ray Data's execution counter, 0 in every new driver)."""
    uri = mixed[2]
    config = StreamConfig(augment=AugmentConfig(resize=SMALL), seed=11, rows_per_task=2)
    uninterrupted = _epoch_log(uri, config, range(2))
    resumed = _epoch_log(uri, config, [1])
    assert resumed[0] == uninterrupted[1]
    ds = train_dataset(ParquetSource(uri), StorageConfig(), config, epoch=1)
    twice = [
        [int(t["image_id"]) for _, ts in iter_train_batches(ds, batch_size=2, epoch=1, seed=11) for t in ts]
        for _ in "ab"
    ]
    assert twice[0] == twice[1] == [i for i, _, _ in uninterrupted[1]]  # a dataset is one epoch, however often read


@pytest.mark.timeout(120)
def test_parquet_epochs_start_no_footer_reader_actors(mixed: tuple) -> None:
    """Each execution of a V2 ``read_parquet`` starts a pool of ``FooterReader`` actors (a worker process each); on
    small machines that churn stalled whole training runs, so the stream plans its reads with the V1 reader."""
    import ray
    from ray.data import DataContext

    before = DataContext.get_current().use_datasource_v2
    for epoch in range(2):
        ds = train_dataset(ParquetSource(mixed[2]), StorageConfig(), CONFIG, epoch=epoch)
        assert list(iter_train_batches(ds, batch_size=2, epoch=epoch, seed=0))
        assert "ReadParquet" in ds.stats() and "ListFiles" not in ds.stats()
    classes = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}  # alive and dead
    assert "FooterReader" not in classes
    assert DataContext.get_current().use_datasource_v2 == before, "the setting is scoped to planning the read"


def _split_logs(uri: str, epoch: int, config: StreamConfig = CONFIG) -> dict[int, list[tuple[int, bool]]]:
    """As the training job does: epoch ``epoch`` split ``streaming_split(2, equal=True)``, one thread per rank
    consuming its shard concurrently; ``{rank: [(image_id, flipped), ...]}`` in delivery order."""
    shards = train_dataset(ParquetSource(uri), StorageConfig(), config, epoch=epoch).streaming_split(2, equal=True)
    return _consume(shards, epoch)


def _consume(shards: list, epoch: int) -> dict[int, list[tuple[int, bool]]]:
    """One thread per rank consuming its shard of ``epoch`` concurrently, as Train workers do."""
    logs: dict[int, list[tuple[int, bool]]] = {}

    def worker(rank: int) -> None:
        batches = iter_train_batches(shards[rank], batch_size=2, epoch=epoch, seed=rank)
        logs[rank] = [(int(t["image_id"]), bool(t["flipped"])) for _, ts in batches for t in ts]

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=100)
    assert sorted(logs) == [0, 1], "a shard did not finish its epoch"
    return logs


@pytest.mark.timeout(180)
def test_two_train_shards_cover_every_image_once_and_the_same_each_time(synth_parquet: tuple) -> None:
    """Every image once per epoch across the ranks, and each rank's shard (rows and order) the same every time
    the epoch is split: what lets a restarted worker group continue its epoch where it stopped."""
    uri, records = synth_parquet
    assert len(records) % 2 == 0  # equal=True drops the remainder rows of an odd count
    epochs = [_split_logs(uri, epoch) for epoch in range(2)]
    for epoch, logs in enumerate(epochs):
        counts = Counter(i for r in (0, 1) for i, _ in logs[r])
        assert counts == Counter(list(records)), f"epoch {epoch}: not every image exactly once"
        assert logs[0] and logs[1]
    flips = [{i: f for r in (0, 1) for i, f in logs[r]} for logs in epochs]
    assert flips[0] != flips[1]
    config = dataclasses.replace(CONFIG, rows_per_task=1)  # more, smaller blocks for the splitter to deal
    assert _split_logs(uri, 1, config) == _split_logs(uri, 1, config)


@pytest.mark.timeout(60)
def test_local_parquet_dataset_streams_like_s3(mixed: tuple, tmp_path: pathlib.Path) -> None:
    annotations_uri, images_uri, _, records = mixed
    _prepare(annotations_uri, images_uri, str(tmp_path / "prepared"))
    batches = iter_eval_batches(eval_dataset(ParquetSource(str(tmp_path / "prepared")), config=CONFIG), batch_size=4)
    targets = [t for _, ts in batches for t in ts]
    assert sorted(int(t["image_id"]) for t in targets) == sorted(records)
    _check_against_source(targets, records, crowd=True)


@pytest.mark.timeout(60)
def test_parquet_without_manifest_is_refused_as_incomplete(mixed: tuple, ray_cluster: S3Server) -> None:
    bucket = ray_cluster.create_bucket()
    write_bytes(join(bucket, "partial", "part-0.parquet"), b"PAR1")
    with pytest.raises(IncompleteDatasetError, match=r"partial.*incomplete"):
        train_dataset(ParquetSource(join(bucket, "partial")), StorageConfig(), CONFIG)


@pytest.mark.timeout(60)
def test_corrupt_image_in_the_stream_names_the_image(ray_cluster: S3Server) -> None:
    root = ray_cluster.create_bucket()
    doc = {
        "images": [{"id": 9, "file_name": "bad.jpg", "width": 8, "height": 8}],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    write_bytes(join(root, "ann.json"), json.dumps(doc).encode())
    write_bytes(join(root, "img", "bad.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = eval_dataset(CocoSource(join(root, "ann.json"), join(root, "img")), StorageConfig(), CONFIG)
    with pytest.raises(Exception, match=r"image id 9 \('bad\.jpg'\)"):
        list(iter_eval_batches(ds, batch_size=1))


class _FakeShard:
    """A DataIterator stand-in: ``iter_batches`` yields fixed numpy chunks (to test grouping without Ray)."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.rows = [
            {"image_id": i, "image": np.zeros((h, w, 3), np.uint8), "boxes": np.zeros(0, np.float32),
             "labels": np.zeros(0, np.int32), "orig_width": w, "orig_height": h, "scale_x": 1.0, "scale_y": 1.0,
             "flipped": False}
            for i, (w, h) in enumerate(shapes)
        ]  # fmt: skip

    def iter_batches(self, *, batch_size: int, **_: object) -> Iterator[dict[str, list]]:
        for k in range(0, len(self.rows), batch_size):
            chunk = self.rows[k : k + batch_size]
            yield {name: [row[name] for row in chunk] for name in chunk[0]}


def test_aspect_ratio_grouping_yields_homogeneous_batches_and_every_row_once() -> None:
    shapes = [(4, 3), (3, 4), (5, 5), (2, 6), (6, 2), (3, 9), (9, 3), (4, 4), (1, 2)]
    wide = {i for i, (w, h) in enumerate(shapes) if w >= h}
    batches = list(iter_train_batches(_FakeShard(shapes), batch_size=2, epoch=0, shuffle_buffer_size=0))
    ids = [[int(t["image_id"]) for t in targets] for _, targets in batches]
    assert sorted(i for b in ids for i in b) == list(range(len(shapes)))
    assert all(set(b) <= wide or not set(b) & wide for b in ids)
    assert [len(b) for b in ids[:-2]] == [2] * (len(ids) - 2)  # only the two final leftovers may be short
    dropped = list(iter_train_batches(_FakeShard(shapes), batch_size=2, epoch=0, shuffle_buffer_size=0, drop_last=True))
    assert all(len(targets) == 2 for _, targets in dropped) and len(dropped) == 4


def test_shuffle_buffer_is_a_seeded_permutation_per_epoch() -> None:
    shard = _FakeShard([(4, 3)] * 20)

    def order(seed: int, epoch: int) -> list[int]:
        batches = iter_train_batches(shard, batch_size=3, epoch=epoch, seed=seed, shuffle_buffer_size=5)
        return [int(t["image_id"]) for _, targets in batches for t in targets]

    first = order(0, 0)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert order(0, 0) == first
    assert order(0, 1) != first and order(1, 0) != first


@pytest.mark.timeout(180)
def test_epoch_shards_give_a_new_worker_group_the_same_shards_from_loaded_coco_records(mixed: tuple) -> None:
    """The job's :class:`EpochShards` actor over a raw COCO source whose records the driver loaded once: each rank
    its shard of the epoch, and a new worker group gets the epoch split anew, identical."""
    import ray

    from jobs.train.shards import epoch_shards
    from pipeline.coco import load_coco

    annotations_uri, images_uri, _, records = mixed
    source = CocoSource(annotations_uri, images_uri, dataset=load_coco(annotations_uri))
    config = dataclasses.replace(CONFIG, rows_per_task=2)
    shards = epoch_shards(source, StorageConfig(), config, world_size=2)

    def epoch_logs(epoch: int, group: str = "g1") -> dict[int, list[tuple[int, bool]]]:
        return _consume([ray.get(shards.shard.remote(epoch, rank, group)) for rank in (0, 1)], epoch)

    assert len(records) % 2 == 0  # equal=True drops the remainder rows of an odd count
    try:
        first = epoch_logs(1)
        assert sorted(i for r in (0, 1) for i, _ in first[r]) == sorted(records)
        assert epoch_logs(1, "g2") == first, "a new worker group gets the same shards"
        epoch_logs(2, "g2")
        epoch_logs(3, "g2")
        assert ray.get(shards.epochs_held.remote()) == [2, 3], "older epochs are let go"
        ray.get(shards.shard.remote(3, 0, "g3"))  # a half-asked epoch of a new group (rank 1 not asked yet)
        assert ray.get(shards.epochs_held.remote()) == [3], "a new group drops the old group's splits"
    finally:
        ray.kill(shards)

"""Ray Data streams of decoded, resized (and for training, flipped) detection images.

Two sources, one stream:

* :class:`ParquetSource`: the directory ``dhrcnn prepare`` wrote (local path or ``s3://``), the fast path.
  Read with ``ray.data.read_parquet`` through the pyarrow filesystem from :mod:`pipeline.storage`; refused
  unless its ``manifest.json`` exists (``prepare`` writes it last, so without it the dataset is incomplete).
* :class:`CocoSource`: an instances JSON plus an image prefix, for users who skip ``prepare``. The records
  come from :func:`pipeline.coco.load_coco` on the driver (annotations only, no pixels); image bytes are
  fetched inside Ray Data tasks, several requests in flight per task.

Decoding (:mod:`pipeline.decode`) and the transforms (:mod:`pipeline.transforms`) run in ``map_batches`` tasks
on CPU workers, one CPU each; rows leave them as uint8 ``[h, w, 3]`` images in the object store, with this
schema (see :data:`pipeline.collate.STREAM_COLUMNS`): ``image_id`` int64, ``image`` variable-shaped uint8
tensor ``[h, w, 3]``, ``boxes`` list<float32> (flattened xyxy in resized pixels), ``labels`` list<int32>,
``orig_width``/``orig_height`` int32, ``scale_x``/``scale_y`` float64, ``flipped`` bool, and for evaluation
``iscrowd`` list<bool>. Training drops crowd boxes (never positives); evaluation keeps them.

Epochs. Training builds one dataset per epoch (:func:`train_dataset` with ``epoch=``), and everything random in it
is drawn from ``(seed, epoch)`` alone: the Parquet file order (COCO: block order) from ``epoch_seed(seed,
epoch)``, each image's scale and flip from ``image_rng(seed, epoch, image_id)``. With ``deterministic`` (the
default) Ray Data keeps the output order (``preserve_order``), so ``streaming_split(n, equal=True)`` hands every
shard the same rows in the same order each time the epoch is built: a new driver, a restarted worker group or
a resumed job sees exactly the epoch an uninterrupted run saw. There is no global shuffle;
:func:`iter_train_batches` adds a seeded shuffle buffer and aspect-ratio grouping on the consuming worker.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import FileShuffleConfig
from ray.data.context import DataContext
from ray.data.extensions import ArrowVariableShapedTensorArray, ArrowVariableShapedTensorType
from torch import Tensor

from pipeline.coco import CocoDataset, DatasetError, load_coco, safe_join
from pipeline.collate import collate
from pipeline.decode import decode_image
from pipeline.fetch import records_to_table
from pipeline.manifest import manifest_uri, read_manifest
from pipeline.storage import StorageConfig, exists, read_many, resolve
from pipeline.transforms import AugmentConfig, Transformed, eval_transform, image_rng, train_transform

_INPUT_COLUMNS = ["image_id", "file_name", "width", "height", "image", "boxes", "labels", "iscrowd"]
_TRAIN_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("image", ArrowVariableShapedTensorType(pa.uint8(), 3)),
        ("boxes", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int32())),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("scale_x", pa.float64()),
        ("scale_y", pa.float64()),
        ("flipped", pa.bool_()),
    ]
)
_EVAL_SCHEMA = _TRAIN_SCHEMA.append(pa.field("iscrowd", pa.list_(pa.bool_())))


@dataclass(frozen=True)
class ParquetSource:
    """A dataset written by ``dhrcnn prepare``: Parquet files plus ``manifest.json`` under ``uri``."""

    uri: str


@dataclass(frozen=True)
class CocoSource:
    """A raw COCO dataset: instances JSON at ``annotations_uri``, image files under ``images_uri``.

    ``dataset``: that JSON already loaded on the driver (:func:`pipeline.coco.load_coco`), so that the stream
    does not read and parse it again; ``None``: the stream loads it.
    """

    annotations_uri: str
    images_uri: str
    dataset: CocoDataset | None = field(default=None, compare=False, repr=False)


Source = ParquetSource | CocoSource


@dataclass(frozen=True)
class StreamConfig:
    """How the stream is built.

    Attributes:
        augment: resize and flip settings (evaluation uses ``augment.resize`` without flip).
        seed: base seed of the per-epoch file shuffle and per-image augmentation.
        rows_per_task: rows per ``map_batches`` call (decode + transform); also the block size of a COCO source.
        shuffle_files: shuffle Parquet files / COCO blocks per epoch (training only).
        drop_images_without_boxes: training only: skip images with no non-crowd box (detectron2 default).
        fetch_threads: concurrent image GETs per task for a :class:`CocoSource`.
        deterministic: training: keep Ray Data's output order fixed (``preserve_order``), so that ``(seed,
            epoch)`` fixes the row order and each shard's rows too, not only each image's scale and flip; what an
            exact resume needs. ``False`` trades that for throughput (rows leave in task completion order).
    """

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    rows_per_task: int = 16
    shuffle_files: bool = True
    drop_images_without_boxes: bool = False
    fetch_threads: int = 8
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.rows_per_task < 1:
            raise ValueError(f"stream.rows_per_task: expected >= 1, got {self.rows_per_task}")
        if self.fetch_threads < 1:
            raise ValueError(f"stream.fetch_threads: expected >= 1, got {self.fetch_threads}")


class BatchIterable(Protocol):
    """Anything with Ray Data's ``iter_batches``: a ``Dataset`` or a Ray Train ``DataIterator`` shard."""

    def iter_batches(self, **kwargs: Any) -> Iterable[Mapping[str, Any]]: ...


class IncompleteDatasetError(DatasetError):
    """A Parquet dataset without ``manifest.json``: ``prepare`` has not finished (or crashed)."""


def train_dataset(
    source: Source, storage: StorageConfig | None = None, config: StreamConfig | None = None, *, epoch: int = 0
) -> ray.data.Dataset:
    """Epoch ``epoch`` of the training stream: files in an order drawn from ``(config.seed, epoch)``, multi-scale
    resize and random flip from ``image_rng(config.seed, epoch, image_id)``, crowd boxes removed. Build one per
    epoch: the dataset does not change between its executions.

    ``storage``: how to reach ``s3://`` sources (``None``: the AWS variables of each process); it travels to
    the Ray tasks without its credentials, which the workers take from their own environment.
    """
    config = config or StreamConfig()
    storage = storage or StorageConfig()
    shuffle_seed = epoch_seed(config.seed, epoch) if config.shuffle_files else None
    return _transformed(_read(source, storage, config, shuffle_seed=shuffle_seed), config, epoch=epoch)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s file (or block) order: a function of ``(seed, epoch)`` only."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(epoch) % 2**63]).generate_state(1)[0])


def eval_dataset(
    source: Source, storage: StorageConfig | None = None, config: StreamConfig | None = None
) -> ray.data.Dataset:
    """The evaluation stream: every image once, resized to ``test_min_size``, no flip, crowd boxes kept
    (with an ``iscrowd`` column) so that predictions can be scored and mapped back to original pixels."""
    config = config or StreamConfig()
    storage = storage or StorageConfig()
    return _transformed(_read(source, storage, config, shuffle_seed=None), config, epoch=None)


def iter_train_batches(
    data: BatchIterable,
    *,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    shuffle_buffer_size: int = 64,
    drop_last: bool = False,
    prefetch_batches: int = 2,
) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Yield ``(images, targets)`` batches of ``batch_size`` images that share an orientation (w >= h or w < h).

    ``data`` is a Dataset or the ``DataIterator`` of ``ray.train.get_dataset_shard(name)``; call once per epoch.
    Each image becomes a CHW tensor as it arrives (:func:`pipeline.collate.collate`, the copy the model needs
    anyway), then passes a shuffle buffer of ``shuffle_buffer_size`` images (each arrival swaps with a resident
    drawn from a generator seeded by ``(seed, epoch)``; give each Ray Train worker its own ``seed``, e.g.
    ``base + world_rank``), then one bucket per orientation, as mmdet's ``AspectRatioBatchSampler`` and
    detectron2's ``AspectRatioGroupedDataset`` do. Partial buckets are yielded at the end unless ``drop_last``.
    The consumer holds at most ``shuffle_buffer_size + 2 * batch_size`` decoded images.
    """
    samples = _samples(data, batch_size, prefetch_batches)
    if shuffle_buffer_size > 0:
        rng = np.random.default_rng([int(seed) % 2**63, int(epoch) % 2**63])
        samples = _shuffled(samples, shuffle_buffer_size, rng)
    yield from _grouped(samples, batch_size, drop_last)


def iter_eval_batches(
    data: BatchIterable, *, batch_size: int, prefetch_batches: int = 2
) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Yield every image of an evaluation stream once, collated, grouped by orientation (less padding)."""
    yield from _grouped(_samples(data, batch_size, prefetch_batches), batch_size, drop_last=False)


Sample = tuple[Tensor, dict[str, Tensor]]


def _samples(data: BatchIterable, chunk_size: int, prefetch_batches: int) -> Iterator[Sample]:
    chunks = data.iter_batches(batch_size=chunk_size, batch_format="numpy", prefetch_batches=prefetch_batches)
    for chunk in chunks:
        images, targets = collate(chunk)
        yield from zip(images, targets, strict=True)


def _shuffled(samples: Iterable[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _grouped(samples: Iterable[Sample], batch_size: int, drop_last: bool) -> Iterator[tuple[list, list]]:
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    buckets: dict[bool, list[Sample]] = {True: [], False: []}
    for image, target in samples:
        wide = image.shape[2] >= image.shape[1]
        buckets[wide].append((image, target))
        if len(buckets[wide]) == batch_size:
            yield [im for im, _ in buckets[wide]], [t for _, t in buckets[wide]]
            buckets[wide] = []
    for bucket in buckets.values():
        if bucket and not drop_last:
            yield [im for im, _ in bucket], [t for _, t in bucket]


# --------------------------------------------------------------------------------------------- reading


def _transformed(ds: ray.data.Dataset, config: StreamConfig, *, epoch: int | None) -> ray.data.Dataset:
    """Decode and transform in ``map_batches`` tasks: training augmentation of ``epoch``, or evaluation (``None``)."""
    out = ds.map_batches(
        _transform_batch,
        batch_size=config.rows_per_task,
        batch_format="pyarrow",
        num_cpus=1,  # whole CPUs: fractional ones oversubscribe small machines and starve the consumers
        fn_kwargs={"config": config, "epoch": epoch},
    )
    if epoch is not None and config.deterministic:
        out.context.execution_options.preserve_order = True  # this dataset's own context, not the global one
    return out


def _read(
    source: Source, storage: StorageConfig, config: StreamConfig, *, shuffle_seed: int | None
) -> ray.data.Dataset:
    if isinstance(source, ParquetSource):
        filesystem, paths = _manifest_shards(source.uri, storage)
        shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
        with _parquet_reader_v1():
            # one read task per file, whatever the cluster's size: the blocks (and so each rank's rows) stay fixed
            ds = ray.data.read_parquet(paths, filesystem=filesystem, shuffle=shuffle, override_num_blocks=len(paths))
        return ds.select_columns(_INPUT_COLUMNS)
    if isinstance(source, CocoSource):
        return _read_coco(source, storage, config, shuffle_seed=shuffle_seed)
    raise TypeError(f"source: expected ParquetSource or CocoSource, got {type(source).__name__}")


@contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Plan ``read_parquet`` with Ray Data's V1 Parquet datasource (``DataContext.use_datasource_v2 = False``
    for the duration of the call; the setting is read when the read is planned, then restored).

    Why: the V2 datasource (Ray's default since 2.5x) lists files on every execution, i.e. every epoch, by
    starting a pool of ``FooterReader`` actors (32 by default, ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``), each
    a new Python worker process, to read Parquet footers in parallel. The shards here are few and listed by
    the manifest, so that pool is pure start-up cost: reading a 2-shard dataset for 3 epochs on the 2-core
    machine took 9.3 s (V2) vs 1.9 s (V1), and 93 s vs 19 s beside two busy processes, where the actor churn
    (hundreds of worker processes started and cancelled during one training test) stalled whole test runs.
    V1 shuffles the files with the same ``FileShuffleConfig``.
    """
    context = DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def _manifest_shards(uri: str, storage: StorageConfig) -> tuple[Any, list[str]]:
    """The filesystem and paths of the shards listed in ``uri``'s manifest (never unlisted files: those belong
    to an unfinished or superseded ``prepare`` attempt)."""
    if not exists(manifest_uri(uri), storage):
        raise IncompleteDatasetError(
            f"{uri}: no manifest.json, so the dataset is incomplete (`dhrcnn prepare` has not finished, or "
            "crashed; the manifest is written last). Rerun `dhrcnn prepare` with this --out."
        )
    shard_uris = read_manifest(uri, storage).shard_uris(uri)
    if not shard_uris:
        raise DatasetError(f"{manifest_uri(uri)}: the manifest lists no shards")
    filesystem, _ = resolve(shard_uris[0], storage)
    return filesystem, [resolve(u, storage)[1] for u in shard_uris]


def _read_coco(
    source: CocoSource, storage: StorageConfig, config: StreamConfig, *, shuffle_seed: int | None
) -> ray.data.Dataset:
    """Records on the driver (annotations only), in blocks of ``rows_per_task``; bytes fetched in tasks."""
    dataset = source.dataset if source.dataset is not None else load_coco(source.annotations_uri, storage)
    table = records_to_table(dataset.records)
    n_blocks = max(1, math.ceil(table.num_rows / config.rows_per_task))
    bounds = np.linspace(0, table.num_rows, n_blocks + 1).astype(int)
    ds = ray.data.from_arrow([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=False))
    return ds.map_batches(
        _fetch_images,
        batch_size=config.rows_per_task,
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={"images_uri": source.images_uri, "storage": storage, "threads": config.fetch_threads},
    )


def _fetch_images(table: pa.Table, *, images_uri: str, storage: StorageConfig, threads: int) -> pa.Table:
    """Add the ``image`` binary column: the encoded bytes of each row's file, ``threads`` GETs in flight."""
    filesystem, _ = resolve(images_uri, storage)
    uris = [safe_join(images_uri, name) for name in table.column("file_name").to_pylist()]
    blobs = read_many(uris, storage, filesystem=filesystem, threads=threads)
    for blob in blobs:
        if isinstance(blob, Exception):
            raise blob
    return table.append_column("image", pa.array(blobs, pa.binary()))


# --------------------------------------------------------------------------------------------- transform


def _transform_batch(table: pa.Table, *, config: StreamConfig, epoch: int | None) -> pa.Table:
    """The ``map_batches`` UDF: :func:`transform_table` for training epoch ``epoch`` (``None``: evaluation)."""
    return transform_table(table, train=epoch is not None, config=config, epoch=epoch or 0)


def transform_table(table: pa.Table, *, train: bool, config: StreamConfig, epoch: int = 0) -> pa.Table:
    """Decode, check and transform every row of ``table`` (columns of ``prepare``'s Parquet: ``image_id``,
    ``file_name``, ``width``, ``height``, ``image``, ``boxes``, ``labels``, ``iscrowd``) into the stream schema
    of the module docstring. Training: crowd boxes removed, scale and flip from ``image_rng(config.seed, epoch,
    image_id)``. Evaluation: ``test_min_size`` resize, no flip, ``iscrowd`` kept.

    Raises:
        pipeline.decode.ImageDecodeError, pipeline.decode.ImageSizeMismatchError: naming the image.
    """
    ids = table.column("image_id").to_numpy()
    names = table.column("file_name").to_pylist()
    widths = table.column("width").to_numpy()
    heights = table.column("height").to_numpy()
    blobs = table.column("image").to_pylist()
    all_boxes = _ragged(table, "boxes", np.float32)
    all_labels = _ragged(table, "labels", np.int32)
    all_crowd = _ragged(table, "iscrowd", np.bool_)

    kept: list[int] = []
    kept_labels: list[np.ndarray] = []
    kept_crowd: list[np.ndarray] = []
    results: list[Transformed] = []
    for i, image_id in enumerate(ids):
        boxes, labels, crowd = all_boxes[i].reshape(-1, 4), all_labels[i], all_crowd[i]
        if train:
            boxes, labels, crowd = boxes[~crowd], labels[~crowd], crowd[~crowd]
            if config.drop_images_without_boxes and len(boxes) == 0:
                continue
        size = (int(widths[i]), int(heights[i]))
        pixels = decode_image(blobs[i], image_id=int(image_id), file_name=names[i], expected_size=size)
        if train:
            rng = image_rng(config.seed, epoch, int(image_id))
            results.append(train_transform(pixels, boxes, config.augment, rng))
        else:
            results.append(eval_transform(pixels, boxes, config.augment.resize))
        kept.append(i)
        kept_labels.append(labels)
        kept_crowd.append(crowd)

    schema = _TRAIN_SCHEMA if train else _EVAL_SCHEMA
    if not results:
        return schema.empty_table()
    columns: dict[str, pa.Array] = {
        "image_id": pa.array(ids[kept], pa.int64()),
        "image": _images_array([r.image for r in results]),
        "boxes": _list_array([r.boxes.reshape(-1) for r in results], pa.float32()),
        "labels": _list_array(kept_labels, pa.int32()),
        "orig_width": pa.array(widths[kept], pa.int32()),
        "orig_height": pa.array(heights[kept], pa.int32()),
        "scale_x": pa.array([r.scale_factor[0] for r in results], pa.float64()),
        "scale_y": pa.array([r.scale_factor[1] for r in results], pa.float64()),
        "flipped": pa.array([r.flipped for r in results], pa.bool_()),
    }
    if not train:
        columns["iscrowd"] = _list_array(kept_crowd, pa.bool_())
    return pa.table(columns, schema=schema)


def _ragged(table: pa.Table, name: str, dtype: type) -> list[np.ndarray]:
    """Zero-copy per-row numpy views of a list<...> column (nulls read as empty)."""
    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # a column with no chunks
        column = pa.array([], column.type)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    offsets = column.offsets.to_numpy()
    base = int(offsets[0]) if len(offsets) else 0
    return [values[int(a) - base : int(b) - base] for a, b in itertools.pairwise(offsets)]


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list<value_type> array from per-row 1-D numpy arrays."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    dtype = value_type.to_pandas_dtype()
    values = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _images_array(images: list[np.ndarray]) -> pa.Array:
    """Variable-shaped uint8 ``[h, w, 3]`` tensor column (an explicit type, even for equal shapes)."""
    arr = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        arr[i] = image
    return ArrowVariableShapedTensorArray.from_numpy(arr)

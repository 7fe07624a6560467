"""Batch inference with Ray Data: a registered detector over a folder or an ``s3://`` prefix of images.

``dhrcnn predict --model models:/NAME@ALIAS --images URI --out URI`` (see :func:`run_predict`):

1. On the driver: the model URI is resolved once (an alias to its version's artifacts, so a moved alias cannot
   mix versions mid-job) and its ``MLmodel`` checked to be this project's detector pyfunc; the images are listed
   by extension (:data:`IMAGE_SUFFIXES`) and given ids.
2. ``ray.data.from_items`` of ``(uri, file_name, image_id)`` -> ``map_batches`` on a pool of ``concurrency``
   :class:`DetectorActor` (model loaded once per actor; a GPU each when the cluster has GPUs): fetch, decode
   (EXIF applied), then the model's :class:`~jobs.evaluate.predictor.Predictor`, as the served pyfunc does (evaluation
   resize, batches of equal padded shape only, so results do not depend on the batch; boxes back in original
   pixels). Fetching in the actor leaves no read
   tasks for a pool holding every CPU of a small machine to starve. 3. Results (small) written by the driver.

Outputs (``out`` is a local folder or an ``s3://`` prefix):

* ``detections.json``: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` in
  original-image pixels, scorable by ``dhrcnn evaluate --gt GT.json --detections``.
* ``images.json`` (without ``annotations``): the COCO ``images`` list ``[{"id", "file_name", "width",
  "height"}]`` the ids refer to: ``1..N`` over the image files in sorted relative-path order (stable for a given
  listing; an undecodable file keeps its id, unused). With ``annotations`` the ids are the GT's, matched on
  ``file_name`` (relative to ``images``); image files the GT does not name are skipped.
* ``detections.parquet``: one row per image: ``file_name`` string, ``image_id`` int64, ``width``, ``height``
  int32 (after EXIF orientation), ``boxes`` list<float32> (flattened ``[4 D]`` xyxy, original pixels),
  ``scores`` list<float32> (descending), ``labels`` list<int64> (1..K; 0 = background never appears),
  ``category_ids`` list<int64> (the dataset's ids), ``category_names`` list<string>.
* ``rendered/<file stem>.jpg`` (with ``render > 0``): the first ``render`` images (by id) with their boxes
  scoring at least ``render_score_thresh`` drawn.
* ``skipped.json`` (only when something was skipped): ``[{"file_name", "reason"}]``.

Bad input: an object without an image extension, or with one but bytes Pillow cannot decode, is **skipped**
with a warning (count, first names) and listed in ``skipped.json``: a stray ``.DS_Store`` or a truncated upload
should not sink a batch job. Fatal, with a one-line message: no image files, nothing decodable, an unreadable
object (storage errors are not data errors), an unknown alias, a model of another flavour, an unreachable
tracking server (:class:`PredictError`, ``RegistryError``, ``TrackingError``, ``StorageError``).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.mlflow.registry import check_detector
from jobs.mlflow.uri import resolve_tracking_uri
from pipeline.coco import DatasetError, check_file_name
from pipeline.storage import StorageConfig, StorageError, join, list_files, read_bytes, read_many, resolve, write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SHOWN = 5  # file names quoted in a warning or an error, at most
_FETCH_THREADS = 8

OUTPUT_SCHEMA = pa.schema(
    [
        ("file_name", pa.string()),
        ("image_id", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.float32())),
        ("scores", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
        ("category_ids", pa.list_(pa.int64())),
        ("category_names", pa.list_(pa.string())),
    ]
)
_ACTOR_SCHEMA = OUTPUT_SCHEMA.append(pa.field("skip", pa.string())).append(pa.field("error", pa.string()))


class PredictError(ValueError):
    """The inputs of a prediction job are unusable; the message names the URI or file and what to do."""


@dataclass(frozen=True)
class PredictConfig:
    """One ``dhrcnn predict`` job.

    Attributes:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model`` or a pulled folder.
        images: folder or ``s3://`` prefix, listed recursively. out: output folder or prefix.
        annotations: a COCO instances file whose ``file_name`` (relative to ``images``) gives the image ids.
        tracking_uri: MLflow tracking URI (``None``: ``MLFLOW_TRACKING_URI``, else the local sqlite store).
        batch_size: images per actor call. score_thresh: detections scoring below it are dropped.
        concurrency: actors in the pool. cpus_per_actor, gpus_per_actor: Ray resources of each actor
            (``gpus_per_actor=None``: 1 when the cluster has a GPU, else 0).
        render: images drawn into ``out/rendered``. render_score_thresh: boxes drawn score at least this.
        storage: how to reach ``s3://`` URIs (workers take credentials from their own environment).
    """

    model_uri: str
    images: str
    out: str
    annotations: str | None = None
    tracking_uri: str | None = None
    batch_size: int = 4
    score_thresh: float = 0.0
    concurrency: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    render: int = 0
    render_score_thresh: float = 0.3
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.concurrency < 1 or self.cpus_per_actor <= 0:
            raise PredictError("--batch-size and --concurrency must be >= 1, --cpus-per-actor > 0")
        if self.render < 0 or (self.gpus_per_actor or 0) < 0 or not 0.0 <= self.score_thresh <= 1.0:
            raise PredictError("--render and --gpus-per-actor must be >= 0, --score-thresh in [0, 1]")


@dataclass(frozen=True)
class ImageItem:
    """An image file to predict on: its URI, its path relative to the images prefix, its COCO id."""

    uri: str
    file_name: str
    image_id: int


@dataclass(frozen=True)
class PredictResult:
    """What a job did: images predicted, detections written, ``(file_name, reason)`` skipped, files written."""

    num_images: int
    num_detections: int
    skipped: tuple[tuple[str, str], ...]
    written: tuple[str, ...]


def list_images(
    images: str, storage: StorageConfig, annotations: str | None = None
) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """The image files under ``images`` with their ids, and ``(file_name, reason)`` of the files left out (with a
    warning): files without an image extension and, with ``annotations``, images it does not name."""
    base = images.rstrip("/")
    files = {uri[len(base) + 1 :]: uri for uri in list_files(images, storage)}
    names = sorted(n for n in files if n.lower().endswith(IMAGE_SUFFIXES))
    others = sorted(set(files) - set(names))
    if not names:
        found = f"{len(files)} files, none named {'/'.join(IMAGE_SUFFIXES)}: {_some(others)}"
        raise PredictError(f"no images under {images} ({found if files else 'nothing there'})")
    if others:
        _warn(f"skipping {len(others)} files under {images} without an image extension: {_some(others)}")
    skipped = [(n, "not an image file (extension)") for n in others]
    if annotations is None:
        return [ImageItem(files[n], n, i) for i, n in enumerate(names, start=1)], skipped
    try:
        gt = json.loads(read_bytes(annotations, storage))
        ids = {str(im["file_name"]): int(im["id"]) for im in gt["images"]}
    except (ValueError, KeyError, TypeError) as err:
        raise PredictError(f"{annotations}: not a COCO instances file ({err})") from err
    items = [ImageItem(files[n], n, ids[n]) for n in names if n in ids]
    unnamed = [n for n in names if n not in ids]
    if unnamed and items:
        _warn(f"skipping {len(unnamed)} images under {images} that {annotations} does not name: {_some(unnamed)}")
    skipped += [(n, f"not in {annotations}") for n in unnamed]
    if not items:
        raise PredictError(
            f"none of the {len(names)} images under {images} ({_some(names)}) is a file_name of {annotations} "
            f"({_some(ids)}); file_name must be relative to --images"
        )
    missing = sorted(set(ids) - set(names))
    if missing:
        _warn(f"{len(missing)} images of {annotations} are not under {images} ({_some(missing)})")
    return items, skipped


class DetectorActor:
    """The ``map_batches`` callable class: the model loaded once per actor, then batches of ``uri``,
    ``file_name``, ``image_id`` in, one :data:`OUTPUT_SCHEMA` row per image out (plus ``skip``: why an
    undecodable image was skipped, ``error``: why an object could not be read; both null when fine)."""

    def __init__(
        self, model_uri: str, tracking_uri: str, images: str, storage: StorageConfig, score_thresh: float, gpu: bool
    ) -> None:
        import torch

        from jobs.denormals import flush_denormals
        from jobs.mlflow.pyfunc_model import load_detector, unwrap

        flush_denormals()  # this actor's process runs the detector (jobs/denormals.py)
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.model = unwrap(load_detector(model_uri, tracking_uri=tracking_uri, device=self.device))
        self.filesystem = resolve(images, storage)[0]
        self.storage = storage
        self.score_thresh = score_thresh

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.decode import ImageDecodeError, decode_image

        uris, names = batch.column("uri").to_pylist(), batch.column("file_name").to_pylist()
        ids = batch.column("image_id").to_pylist()
        blobs = read_many(uris, self.storage, filesystem=self.filesystem, threads=_FETCH_THREADS)
        rows: list[dict[str, Any]] = []
        decoded: dict[int, np.ndarray] = {}  # row index -> image
        for name, image_id, blob in zip(names, ids, blobs, strict=True):
            rows.append({"file_name": name, "image_id": image_id, "skip": None, "error": None})
            if isinstance(blob, StorageError):
                rows[-1]["error"] = str(blob)
                continue
            try:
                decoded[len(rows) - 1] = decode_image(blob, image_id=image_id, file_name=name)
            except ImageDecodeError as err:
                rows[-1]["skip"] = str(err)
        found = self.model.predictor(list(decoded.values()))
        for (index, image), detections in zip(decoded.items(), found, strict=True):
            row = detections.above(self.score_thresh).to_row(self.model.categories)
            row["boxes"] = [float(v) for box in row["boxes"] for v in box]  # flattened [4 D]
            rows[index].update(row, width=image.shape[1], height=image.shape[0])
        return pa.Table.from_pylist(rows, schema=_ACTOR_SCHEMA)


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Run ``cfg`` on the current Ray cluster (started locally if none) and write its outputs."""
    import ray
    import ray.data

    from jobs.ray_env import ensure_ray

    artifact_uri = check_detector(cfg.model_uri, cfg.tracking_uri)
    items, skipped = list_images(cfg.images, cfg.storage, cfg.annotations)
    ensure_ray()
    gpus = _actor_gpus(cfg, ray.cluster_resources())
    ds = ray.data.from_items(
        [{"uri": i.uri, "file_name": i.file_name, "image_id": i.image_id} for i in items],
        override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)),
    )
    ds = ds.map_batches(
        DetectorActor,
        fn_constructor_kwargs={
            "model_uri": artifact_uri,
            "tracking_uri": resolve_tracking_uri(cfg.tracking_uri),
            "images": cfg.images,
            "storage": cfg.storage,
            "score_thresh": cfg.score_thresh,
            "gpu": gpus > 0,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(parts).sort_by("image_id") if parts else _ACTOR_SCHEMA.empty_table()
    return _write_outputs(cfg, table, skipped)


def _actor_gpus(cfg: PredictConfig, resources: dict[str, float]) -> float:
    """GPUs per actor; :class:`PredictError` when the pool cannot fit the cluster (it would wait forever)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if cfg.concurrency * cfg.cpus_per_actor > cpus:
        raise PredictError(
            f"--concurrency {cfg.concurrency} x --cpus-per-actor {cfg.cpus_per_actor:g} needs "
            f"{cfg.concurrency * cfg.cpus_per_actor:g} CPUs; the Ray cluster has {cpus:g}"
        )
    want = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if want * cfg.concurrency > gpus:
        raise PredictError(f"--gpus-per-actor {want:g} x {cfg.concurrency} actors: the Ray cluster has {gpus:g} GPUs")
    return want


def _write_outputs(cfg: PredictConfig, table: pa.Table, skipped: list[tuple[str, str]]) -> PredictResult:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    errors = table.filter(table.column("error").is_valid()).column("error").to_pylist()
    if errors:
        raise PredictError(f"cannot read {len(errors)} of the images; first: {errors[0]}")
    undecodable = table.column("skip").is_valid()
    bad = table.filter(undecodable).select(["file_name", "skip"]).to_pylist()
    if bad:
        _warn(f"skipping {len(bad)} files that are not decodable images: {_some(r['file_name'] for r in bad)}")
    skipped = skipped + [(r["file_name"], r["skip"]) for r in bad]
    table = table.filter(pc.invert(undecodable)).select(OUTPUT_SCHEMA.names)
    if table.num_rows == 0:
        raise PredictError(f"no decodable images under {cfg.images}: {_some(f'{n} ({r})' for n, r in skipped)}")

    rows = table.to_pylist()
    written: list[str] = []

    def put(name: str, data: bytes) -> None:
        uri = join(cfg.out, name)
        write_bytes(uri, data, cfg.storage)
        written.append(uri)

    results = [det for row in rows for det in _coco_results(row)]
    put("detections.json", json.dumps(results).encode())
    if cfg.annotations is None:
        keys = {"id": "image_id", "file_name": "file_name", "width": "width", "height": "height"}
        put("images.json", json.dumps([{k: r[c] for k, c in keys.items()} for r in rows], indent=1).encode())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put("detections.parquet", buffer.getvalue())
    if skipped:
        put("skipped.json", json.dumps([{"file_name": n, "reason": r} for n, r in skipped], indent=1).encode())
    for row in rows[: cfg.render]:
        put(f"rendered/{rendered_name(row['file_name'], row['image_id'])}", _render(cfg, row))
    return PredictResult(len(rows), len(results), tuple(skipped), tuple(written))


def rendered_name(file_name: str, image_id: int) -> str:
    """The picture's name under ``rendered/``: the image's relative path with ``.jpg``, or ``image-<id>.jpg`` for a
    name that is not a safe relative path (``..`` segments, absolute, a URI: an object key may be anything), so
    that no input name writes outside ``--out``."""
    try:
        relative = check_file_name(file_name, "predict")
    except DatasetError:
        return f"image-{int(image_id)}.jpg"
    return f"{posixpath.splitext(relative)[0]}.jpg"


def _coco_results(row: dict[str, Any]) -> list[dict[str, Any]]:
    from jobs.evaluate.coco_eval import detections_to_coco

    boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
    category_of = dict(zip(row["labels"], row["category_ids"], strict=True))
    return detections_to_coco(row["image_id"], boxes, row["scores"], row["labels"], category_of)


def _render(cfg: PredictConfig, row: dict[str, Any]) -> bytes:
    """The image of ``row`` as a JPEG with its boxes (score >= ``cfg.render_score_thresh``) and captions, drawn
    by the evaluation pictures' renderer (:func:`jobs.evaluate.plots.annotate`)."""
    from jobs.evaluate.plots import annotate
    from pipeline.decode import decode_image

    data = read_bytes(join(cfg.images.rstrip("/"), row["file_name"]), cfg.storage)
    image = decode_image(data, image_id=row["image_id"], file_name=row["file_name"])
    names = dict(zip(row["labels"], row["category_names"], strict=True))
    pred = (np.asarray(row["boxes"], np.float64).reshape(-1, 4), row["scores"], row["labels"])
    buffer = io.BytesIO()
    annotate(image, pred, names, cfg.render_score_thresh).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _some(names: Any) -> str:
    shown = list(names)
    more = f" and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else ""
    return ", ".join(repr(n) for n in shown[:_SHOWN]) + more


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)

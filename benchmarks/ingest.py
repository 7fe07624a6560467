"""Ingest throughput: the Ray Data training stream vs a ``torch.utils.data.DataLoader``, same objects, same code.

Both readers consume the same prepared Parquet shards on a local S3 server (moto, started exactly as the test
fixture does), through the same storage code (``pipeline.storage.resolve``), and run the same per-image work
(``pipeline.stream.transform_table``: decode, multi-scale resize, flip; then ``pipeline.collate.collate``):

* Ray: ``train_dataset`` + ``iter_train_batches`` (read + decode + transform in ``map_batches`` tasks of one
  CPU each on a ``num_cpus=WORKERS`` local cluster; aspect-ratio grouping and collate on the driver);
* torch: an ``IterableDataset`` whose ``WORKERS`` worker processes split the shards' row groups and run the
  same functions, with collate in the workers (the usual DataLoader setup).

Each measurement runs in a fresh child process, so the driver's peak memory is the exact RSS high-water mark
(``getrusage(RUSAGE_SELF).ru_maxrss``, children excluded) and the two readers never share a CPU with another
Ray cluster. Ray gets one short warm-up pass (worker processes start and import torch) before its clock starts;
the DataLoader forks its workers from an already-initialised process, inside its timed pass.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/ingest.py --images 1000 5000 --workers 2

``--order-cost`` also measures the Ray stream with ``StreamConfig(deterministic=False)`` (rows in task completion
order instead of the kept order that makes each epoch the same on every run, what an exact resume needs) and
prints what keeping the order costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch.utils.data
from PIL import Image
from ray.data.block import BlockAccessor

from pipeline.collate import collate
from pipeline.manifest import read_manifest
from pipeline.prepare import PrepareOptions, prepare_coco
from pipeline.storage import StorageConfig, join, resolve, write_bytes
from pipeline.stream import ParquetSource, StreamConfig, iter_train_batches, train_dataset, transform_table
from pipeline.synth import SynthConfig, render
from pipeline.transforms import AugmentConfig, ResizeConfig

# Aspect-preserving resize at the detector's defaults (shorter side 800, longer <= 1333), multi-scale training.
TRAIN_MIN_SIZES = (640, 672, 704, 736, 768, 800)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 5000], help="dataset sizes to measure")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs = DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--unique-images", type=int, default=200, help="distinct rendered images, reused")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes per reader; best one counts")
    parser.add_argument("--object-store-mib", type=int, help="Ray object store size (default: Ray's, 30%% of RAM)")
    parser.add_argument("--order-cost", action="store_true", help="also measure Ray without the kept row order")
    parser.add_argument("--measure", choices=["ray", "ray-unordered", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        if args.measure.startswith("ray"):
            ordered = args.measure == "ray"
            print(json.dumps(_measure_ray(args.uri, args.workers, args.batch_size, args.object_store_mib, ordered)))
        else:
            print(json.dumps(_measure_torch(args.uri, args.workers, args.batch_size)))
        return 0

    from jobs.local_s3 import start_s3_server

    t0 = time.perf_counter()
    server = start_s3_server(enforce_auth=True)  # requests signed and checked, as on AWS
    try:
        os.environ.update(server.env)
        datasets = _prepare_datasets(server.create_bucket(), sorted(set(args.images)), args)
        setup = f"{args.workers} workers, batch {args.batch_size}, {args.image_size[0]}x{args.image_size[1]} JPEGs"
        store = f"{args.object_store_mib} MiB" if args.object_store_mib else "Ray's default size"
        print(f"# data ready in {time.perf_counter() - t0:.0f}s; {setup}; resize {TRAIN_MIN_SIZES}/1333 + flip")
        print(f"# Ray object store: {store}")
        print("# driver memory, MiB: RSS high-water mark (+growth during the pass), private (RssAnon) growth,")
        print("# shared (RssShmem: object-store pages mapped by the driver) peak")
        print("# img/s: best of --repeats passes per reader, the readers alternating (other load on the machine")
        print("# slows single passes); every pass is listed in brackets")
        header = f"{'images':>7} {'ray img/s':>18} {'torch img/s':>18} {'ratio':>6} "
        header += f"{'ray driver memory':>36} {'torch driver memory':>36} {'wall s':>7} {'load':>5}"
        print(header, flush=True)
        for n, uri in datasets.items():
            t1, load = time.perf_counter(), os.getloadavg()[0]
            readers = ["ray", "torch", *(["ray-unordered"] if args.order_cost else [])]
            runs: dict[str, list[dict[str, Any]]] = {reader: [] for reader in readers}
            for r in range(args.repeats):
                for reader in readers if r % 2 == 0 else readers[::-1]:
                    res = _child(reader, uri, args)
                    if res["images"] != n:
                        raise RuntimeError(f"{reader} delivered {res['images']} images, expected {n}")
                    runs[reader].append(res)
            rates = {k: [n / res["seconds"] for res in v] for k, v in runs.items()}
            unordered = rates.pop("ray-unordered", None)
            runs.pop("ray-unordered", None)
            peak = {k: max(v, key=lambda res: res["rss_hwm_mib"]) for k, v in runs.items()}
            ray_s, torch_s = (f"{max(rates[k]):.1f} [{'/'.join(f'{x:.0f}' for x in rates[k])}]" for k in runs)
            print(
                f"{n:>7} {ray_s:>18} {torch_s:>18} {max(rates['ray']) / max(rates['torch']):>6.2f} "
                f"{_mem(peak['ray']):>36} {_mem(peak['torch']):>36} {time.perf_counter() - t1:>7.0f} {load:>5.1f}",
                flush=True,
            )
            if unordered:
                print(
                    f"# {n} images, Ray in completion order: {max(unordered):.1f} img/s "
                    f"[{'/'.join(f'{x:.0f}' for x in unordered)}]; kept order / completion order: "
                    f"{max(rates['ray']) / max(unordered):.2f}",
                    flush=True,
                )
    finally:
        server.stop()
    print(f"# total {time.perf_counter() - t0:.0f}s")
    return 0


def _mem(res: dict[str, Any]) -> str:
    """``HWM (+growth) priv +growth shm peak`` in MiB."""
    private = res["private_peak_mib"] - res["private_start_mib"]
    return (
        f"{res['rss_hwm_mib']:.0f} (+{res['rss_hwm_mib'] - res['rss_start_mib']:.0f}) "
        f"priv +{private:.0f} shm {res['shared_peak_mib']:.0f}"
    )


def _child(reader: str, uri: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", reader, "--uri", uri]
    cmd += ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    if args.object_store_mib:
        cmd += ["--object-store-mib", str(args.object_store_mib)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{reader} measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ data


def _prepare_datasets(bucket: str, sizes: list[int], args: argparse.Namespace) -> dict[int, str]:
    """A COCO dataset of ``max(sizes)`` JPEGs (``unique_images`` rendered shapes scenes, reused under distinct
    object keys) and one prepared Parquet dataset per size (the first ``n`` images)."""
    width, height = args.image_size
    synth = SynthConfig(num_images=args.unique_images, seed=0, size=(width, height))
    encoded, objects = [], []
    for i in range(args.unique_images):
        sample = render(i, synth)
        encoded.append(_jpeg(sample.pixels))
        objects.append(sample.objects)
    images_uri = join(bucket, "coco", "images")
    images, annotations = [], []
    for image_id in range(1, max(sizes) + 1):
        k = (image_id - 1) % args.unique_images
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height})
        for obj in objects[k]:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": obj.category_id}
            annotations.append({**ann, "bbox": list(obj.bbox), "area": obj.area, "iscrowd": 0})
    fs, _ = resolve(images_uri)

    def upload(image: dict[str, Any]) -> None:
        data = encoded[(image["id"] - 1) % len(encoded)]
        write_bytes(join(images_uri, image["file_name"]), data, filesystem=fs)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, images))
    categories = [{"id": c, "name": n} for c, n in ((1, "rectangle"), (3, "ellipse"), (7, "triangle"))]
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out: dict[int, str] = {}
    try:
        for n in sizes:
            doc = {"images": images[:n], "annotations": [a for a in annotations if a["image_id"] <= n]}
            ann_uri = join(bucket, "coco", f"instances_{n}.json")
            write_bytes(ann_uri, json.dumps({**doc, "categories": categories}).encode())
            out[n] = join(bucket, f"parquet_{n}")
            prepare_coco(ann_uri, images_uri, out[n], PrepareOptions(rows_per_shard=128), StorageConfig())
    finally:
        ray.shutdown()
    return out


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ readers


def _stream_config() -> StreamConfig:
    return StreamConfig(augment=AugmentConfig(resize=ResizeConfig(train_min_sizes=TRAIN_MIN_SIZES)), seed=0)


class _MemoryWatch:
    """Peak memory of this process over a ``with`` block: the exact RSS high-water mark (``ru_maxrss``, which
    also covers the time before the block) and, sampled every 10 ms from ``/proc/self/status``, the peaks of its
    private part (``RssAnon``: heap, buffers) and of its shared part (``RssShmem``: for Ray, the pages of the
    node's object store that the driver has mapped to read blocks zero-copy; they belong to the store)."""

    def __enter__(self) -> _MemoryWatch:
        self.start = self.peak = _status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            now = _status()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def report(self) -> dict[str, float]:
        return {
            "rss_hwm_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "rss_start_mib": self.start["VmRSS"],
            "private_start_mib": self.start["RssAnon"],
            "private_peak_mib": self.peak["RssAnon"],
            "shared_peak_mib": self.peak["RssShmem"],
        }


def _status() -> dict[str, float]:
    """VmRSS, RssAnon and RssShmem of this process, MiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssShmem")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


def _measure_ray(
    uri: str, workers: int, batch_size: int, object_store_mib: int | None, ordered: bool = True
) -> dict[str, Any]:
    store = object_store_mib * 2**20 if object_store_mib else None
    ray.init(address="local", num_cpus=workers, object_store_memory=store, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = dataclasses.replace(_stream_config(), deterministic=ordered)
    warm_up = train_dataset(ParquetSource(uri), StorageConfig(), config).limit(8 * batch_size * workers)
    for _ in iter_train_batches(warm_up, batch_size=batch_size, epoch=0):
        pass  # start the worker processes (and their imports) before the clock
    ds = train_dataset(ParquetSource(uri), StorageConfig(), config)
    n, t = 0, time.perf_counter()
    with _MemoryWatch() as memory:
        for images, _ in iter_train_batches(ds, batch_size=batch_size, epoch=0):
            n += len(images)
    seconds = time.perf_counter() - t
    ray.shutdown()
    return {"reader": "ray" if ordered else "ray-unordered", "images": n, "seconds": seconds, **memory.report()}


def _measure_torch(uri: str, workers: int, batch_size: int) -> dict[str, Any]:
    data = _ParquetRows(uri, _stream_config())
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, num_workers=workers, collate_fn=_collate_rows, prefetch_factor=2
    )
    n, t = 0, time.perf_counter()
    with _MemoryWatch() as memory:
        for images, _ in loader:
            n += len(images)
    return {"reader": "torch", "images": n, "seconds": time.perf_counter() - t, **memory.report()}


def _collate_rows(rows: list[dict[str, Any]]) -> Any:
    return collate({name: [row[name] for row in rows] for name in rows[0]})


class _ParquetRows(torch.utils.data.IterableDataset):
    """Rows of the transformed stream from the manifest's shards, one row-group slice per work unit; worker
    ``k`` of ``W`` takes units ``k, k + W, ...`` (shuffled with a seed, as the Ray stream shuffles files)."""

    def __init__(self, uri: str, config: StreamConfig) -> None:
        super().__init__()
        self.config = config
        self.units: list[tuple[str, int]] = []
        fs, _ = resolve(uri)
        for shard_uri in read_manifest(uri).shard_uris(uri):
            path = resolve(shard_uri)[1]
            with fs.open_input_file(path) as f:
                self.units += [(path, g) for g in range(pq.ParquetFile(f).num_row_groups)]
        np.random.default_rng(config.seed).shuffle(self.units)
        self.uri = uri

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        rank, world = (info.id, info.num_workers) if info is not None else (0, 1)
        fs, _ = resolve(self.uri)
        columns = ["image_id", "file_name", "width", "height", "image", "boxes", "labels", "iscrowd"]
        step = self.config.rows_per_task
        for path, group in self.units[rank::world]:
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=columns)
            for start in range(0, table.num_rows, step):
                out = transform_table(table.slice(start, step), train=True, config=self.config, epoch=0)
                batch = BlockAccessor.for_block(out).to_numpy()
                for i in range(out.num_rows):
                    yield {name: values[i] for name, values in batch.items()}


if __name__ == "__main__":
    sys.exit(main())

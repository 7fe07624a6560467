"""Training throughput of the Ray Train job: images/s and the fraction of step time spent waiting for data.

CPU (default): the ``tiny`` preset on a synthetic dataset with 1 and then 2 Ray Train workers, in one run,
and the 2-worker / 1-worker ratio. GPU (``--gpu``): ``dh_r50_fpn`` at 1333x800 with AMP, images/s per GPU
and peak GPU memory, for ``--workers`` workers of one GPU each.

    python benchmarks/train_throughput.py                      # CPU, tiny, 1 vs 2 workers
    python benchmarks/train_throughput.py --gpu --workers 1    # GPU, dh_r50_fpn, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from jobs.config import resolve_job_config
from jobs.train.job import run_training
from pipeline.prepare import PrepareOptions, prepare_coco
from pipeline.synth import SynthConfig, write_synth


def make_dataset(root: Path, images: int, size: tuple[int, int] | None) -> None:
    write_synth(str(root / "synth"), SynthConfig(num_images=images, seed=0, val_fraction=0.0, size=size))
    prepare_coco(
        str(root / "synth" / "annotations" / "instances_train.json"),
        str(root / "synth" / "images" / "train"),
        str(root / "parquet"),
        PrepareOptions(rows_per_shard=32),
    )


def measure(root: Path, workers: int, args: argparse.Namespace) -> dict[str, float]:
    gpu = args.gpu
    raw = {
        "model": {"preset": "dh_r50_fpn" if gpu else "tiny", "num_classes": 3},
        "data": {
            "train": {"parquet": str(root / "parquet")},
            "batch_size": args.batch_size,
            "augment": {"resize": {"train_min_sizes": [800 if gpu else 256], "max_size": 1333 if gpu else 352}},
        },
        "train": {
            "epochs": args.epochs,
            "warmup_iters": 10,
            "log_every_iters": 5,
            "grad_clip_norm": 10.0,
            "amp": "bf16" if gpu else "none",
            "eval_every_epochs": 0,
            "steps": [args.epochs],
        },
        "scaling": {"num_workers": workers, "use_gpu": gpu, "cpus_per_worker": 1 if gpu else 0.5},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "registered_model_name": None},
        "run": {"name": f"throughput-{workers}-{time.time_ns()}", "storage_path": str(root / "runs")},
    }
    job = resolve_job_config(raw)
    start = time.perf_counter()
    result = run_training(job, threads_per_worker=None if gpu else max(1, (os.cpu_count() or 2) // workers))
    m = result.metrics
    out = {
        "workers": workers,
        "images_per_s": m["train/images_per_s"],
        "data_wait_fraction": m["train/data_wait_fraction"],
        "wall_s": time.perf_counter() - start,
    }
    if gpu:
        out["images_per_s_per_gpu"] = m["train/images_per_s"] / workers
        out["peak_gpu_mem_gb"] = m.get("train/gpu_mem_gb", float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1 2 (CPU), 1 (GPU)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    workers = args.workers or ([1] if args.gpu else [1, 2])
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, args.images, (1333, 800) if args.gpu else (320, 256))
        rows = [measure(root, w, args) for w in workers]
    print(f"\n{'workers':>8} {'images/s':>10} {'data wait':>10} {'wall s':>8}")
    for r in rows:
        print(
            f"{r['workers']:>8} {r['images_per_s']:>10.2f} {100 * r['data_wait_fraction']:>9.1f}% {r['wall_s']:>8.1f}"
        )
    if len(rows) > 1:
        speedup = rows[-1]["images_per_s"] / rows[0]["images_per_s"]
        print(f"ratio {rows[-1]['workers']} / {rows[0]['workers']} workers: {speedup:.2f}x")
    print(json.dumps({"device": "gpu" if args.gpu else "cpu", "rows": rows}))


if __name__ == "__main__":
    main()

"""The whole path on embedded defaults, on a laptop: synthetic COCO data -> Parquet -> the ``tiny`` detector
trained by 2 Ray Train workers on CPU -> COCO evaluation -> model registered in a local MLflow store."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import JobConfig, resolve_job_config
from jobs.console import PhaseBar, RayConsole, is_tty
from model.typed_config import ConfigError, parse_dotted
from pipeline.prepare import PrepareOptions, prepare_coco
from pipeline.storage import StorageConfig, join
from pipeline.synth import SynthConfig, write_synth

# Objects of 24 px and more: the smallest anchor is 32 px (stride 4 x scale 8), and an object below ~18 px
# never reaches IoU 0.3 with any anchor.
SYNTH = {
    "num_images": 300,
    "seed": 0,
    "val_fraction": 0.2,
    "min_size": (192, 144),
    "max_size": (256, 192),
    "min_object_size": 24,
    "max_objects": 4,
}


def quickstart_config(
    root: str,
    storage: StorageConfig,
    num_classes: int,
    tracking_uri: str | None,
    overrides: list[str] | None = None,
) -> JobConfig:
    """The embedded job: ``tiny`` preset, small images, 2 CPU workers, a short step schedule; ``overrides``
    (``key=value``, as for ``dhrcnn train``) change any of it."""
    raw: dict[str, Any] = {
        # GroupNorm: the 2 workers see 2 images each, too few for BatchNorm statistics from scratch
        "model": {"preset": "tiny", "num_classes": num_classes, "backbone": {"norm": "gn"}},
        "data": {
            "train": {"parquet": join(root, "parquet", "train")},
            "val": {"parquet": join(root, "parquet", "val")},
            "batch_size": 2,
            "eval_batch_size": 4,
            "augment": {"resize": {"train_min_sizes": [160, 176, 192], "test_min_size": 176, "max_size": 256}},
            "storage": {"endpoint_url": storage.endpoint_url, "region": storage.region},
        },
        "train": {
            "epochs": 8,
            # x 4/16 -> 0.01 for 2 workers x 2 images; 0.02 made the from-scratch R-CNN head's loss oscillate
            "base_lr": 0.04,
            "warmup_iters": 50,
            "steps": [6, 8],
            "grad_clip_norm": 10.0,
            "eval_every_epochs": 4,
            "log_every_iters": 20,
            "keep_best": 1,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"tracking_uri": tracking_uri},
        # a new Ray Train run (and MLflow run) per invocation: a rerun starts over instead of resuming a finished one
        "run": {"name": time.strftime("quickstart-%Y%m%d-%H%M%S"), "storage_path": join(root, "runs")},
    }
    return resolve_job_config(raw, overrides)


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``synth.KEY=VALUE`` items -> the synthetic dataset's settings (over :data:`SYNTH`); the rest -> the job."""
    synth = parse_dotted([o for o in overrides if o.startswith("synth.")]).get("synth", {})
    known = set(SynthConfig.__dataclass_fields__)
    unknown = sorted(set(synth) - known)
    if unknown:
        raise ConfigError(f"quickstart: unknown keys synth.{unknown}; the dataset's keys are {sorted(known)}")
    return {**SYNTH, **synth}, [o for o in overrides if not o.startswith("synth.")]


@dataclass(frozen=True)
class QuickstartResult:
    ap: float
    run_uri: str
    model_uri: str
    picture: str
    metrics: dict[str, Any]  # the training job's last report: val/AP ... val/ARl, run_uri, model_uri


def run_quickstart(
    workdir: str,
    storage: StorageConfig,
    tracking_uri: str | None,
    overrides: list[str] | None = None,
    console: RayConsole | None = None,
) -> QuickstartResult:
    """Data, training, evaluation, registration. ``console`` (:func:`jobs.console.ray_console`): progress
    bars for the data, training and evaluation phases, Ray's output per its verbosity (``None``: Ray's)."""
    from jobs.ray_env import ensure_ray
    from jobs.train.job import run_training

    synth, job_overrides = split_overrides(list(overrides or []))
    ensure_ray(num_cpus=max(2, os.cpu_count() or 2), console=console)
    data_root = join(workdir, "synth")
    config = SynthConfig(**synth)
    bar = None
    if console is not None:  # rendering, then preparing each image
        bar = PhaseBar("data", 2 * config.num_images, "img", tty=is_tty() and not console.verbose)
    summaries = write_synth(data_root, config, storage, on_image=bar.update_to if bar is not None else None)
    manifest = None
    for summary in summaries:
        result = prepare_coco(
            summary.annotations_uri,
            summary.images_uri,
            join(workdir, "parquet", summary.split),
            PrepareOptions(rows_per_shard=64, overwrite=True),  # the dataset may differ from the last run's
            storage,
        )
        manifest = result.manifest
        if bar is not None:
            bar.update_to(bar.n + summary.num_images, f"{summary.split} prepared")
    if bar is not None:
        bar.close("Parquet written")
    job = quickstart_config(workdir, storage, manifest.categories.num_classes, tracking_uri, job_overrides)
    picture = str(Path("dhrcnn_quickstart_predictions.png").resolve())
    result = run_training(job, threads_per_worker=1, picture_path=picture, console=console)
    m = result.metrics
    ap = float(m.get("val/AP", -1.0))
    return QuickstartResult(ap, m.get("run_uri", ""), m.get("model_uri", ""), picture, dict(m))

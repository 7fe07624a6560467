"""The job configuration: typed frozen dataclasses (model, data, train, scaling, tracking) loaded from YAML
plus ``key=value`` overrides, validated with errors that name the key. ``dhrcnn train --dry-run`` prints
the resolved result; the same dict is written next to every run and logged to MLflow (secrets never are).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from jobs.mlflow.tracking import TrackingConfig
from model.config import ModelConfig, model_config
from model.typed_config import ConfigError, from_mapping, load_yaml, merge, parse_dotted, to_dict
from pipeline.storage import StorageConfig
from pipeline.transforms import AugmentConfig


@dataclass(frozen=True)
class DatasetSpec:
    """A Parquet dataset written by ``dhrcnn prepare`` (``parquet``), or a raw COCO source
    (``annotations`` + ``images``); local paths or ``s3://`` URIs."""

    parquet: str | None = None
    annotations: str | None = None
    images: str | None = None

    def __post_init__(self) -> None:
        raw = self.annotations is not None or self.images is not None
        if (self.parquet is None) == (not raw) or (raw and (self.annotations is None or self.images is None)):
            raise ConfigError("dataset: give either parquet, or both annotations and images")


@dataclass(frozen=True)
class DataConfig:
    """Datasets, augmentation and batching. ``batch_size`` is per worker (mmdet: 2 images per GPU)."""

    train: DatasetSpec
    val: DatasetSpec | None = None
    batch_size: int = 2
    eval_batch_size: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    rows_per_task: int = 16
    shuffle_buffer_size: int = 64
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass(frozen=True)
class TrainConfig:
    """mmdet's recipe, scaled: SGD, LR ``base_lr`` at ``base_batch_size`` scaled linearly with the real
    total batch, linear warm-up, steps at epochs ``steps`` (×``gamma``) or cosine; per-iteration schedule."""

    epochs: int = 12
    base_lr: float = 0.02
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    schedule: Literal["step", "cosine"] = "step"
    steps: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    grad_clip_norm: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 0
    checkpoint_every_iters: int = 0
    keep_best: int = 2
    eval_every_epochs: int = 1
    eval_max_images: int | None = None
    log_every_iters: int = 20
    max_consecutive_nan: int = 10

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("train.epochs: expected >= 1")
        if self.log_every_iters < 1 or self.checkpoint_every_iters < 0 or self.keep_best < 1:
            raise ConfigError("train: log_every_iters and keep_best must be >= 1, checkpoint_every_iters >= 0")
        if any(s < 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ConfigError(f"train.steps: expected increasing epochs >= 1, got {list(self.steps)}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError("train.grad_clip_norm: expected > 0")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers. On GPUs: one GPU per worker, NCCL; on CPUs: gloo."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0


@dataclass(frozen=True)
class RunSettings:
    """``name`` + ``storage_path`` identify a job: starting it again with both unchanged resumes it.
    ``resume_rescale``: allow that resume to change ``scaling.num_workers`` or ``data.batch_size`` (the LR is
    rescaled to the new total batch: :mod:`jobs.train.rescale`); refused otherwise."""

    name: str = "dhrcnn"
    storage_path: str = "./dhrcnn_runs"
    max_failures: int = 2
    resume_rescale: bool = False


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict without credentials (safe to print, write and log)."""
        data = to_dict(replace(self, data=replace(self.data, storage=self.data.storage.without_secrets())))
        for key in ("access_key_id", "secret_access_key", "session_token"):
            data["data"]["storage"].pop(key, None)
        return data


def resolve_job_config(raw: dict[str, Any], overrides: list[str] | None = None) -> JobConfig:
    """Build a :class:`JobConfig` from a mapping; ``model`` may be ``{preset, num_classes, ...overrides}``."""
    raw = merge(raw, parse_dotted(overrides or []))
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.pop("preset", None)
    if preset is not None:
        if "num_classes" not in model_raw:
            raise ConfigError("missing required key model.num_classes")
        model = model_config(preset, **model_raw)
    else:
        model = from_mapping(ModelConfig, model_raw, "model")
    return from_mapping(JobConfig, {**raw, "model": model}, "")


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    return resolve_job_config(load_yaml(path), overrides)

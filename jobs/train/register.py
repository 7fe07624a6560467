"""A training checkpoint's model logged and registered later, as the end of training would have done it
(:func:`jobs.train.export.log_and_register`): ``dhrcnn models register``. For a job whose final registration
failed (its error names the saved weights and this command), or for any checkpoint of a run."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import yaml

from jobs.config import JobConfig, resolve_job_config
from jobs.mlflow.tracking import Tracker
from jobs.redact import MASK
from jobs.train.checkpoint import STATE_FILE
from jobs.train.export import log_and_register
from jobs.train.job import CONFIG_FILE, existing_run_id
from model.build import build_model
from pipeline.categories import CategoryMap
from pipeline.storage import StorageConfig, exists, is_s3, join, list_files, read_bytes, resolve


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint to register: ``state`` (the trainer's ``state_dict``) read from ``path`` (``.../state.pt``),
    the run directory it belongs to (``run_dir``, where ``config.yaml`` and ``mlflow_run_id`` are)."""

    path: str
    run_dir: str
    state: dict[str, Any]


def find_checkpoint(checkpoint: str, storage: StorageConfig) -> CheckpointSource:
    """The checkpoint ``checkpoint`` names: a ``state.pt``, a checkpoint directory holding one, or a run directory
    (Ray Train's ``checkpoint_*`` folders and :data:`jobs.train.export.UNREGISTERED_DIR` in it: the most
    recently written one).
    Local paths or ``s3://`` URIs. Raises ``FileNotFoundError`` naming the path and what was expected."""
    path = checkpoint.rstrip("/")
    if not is_s3(path):
        path = os.path.abspath(path)
    if path.endswith(f"/{STATE_FILE}"):
        state_file = path
    elif exists(join(path, STATE_FILE), storage):
        state_file = join(path, STATE_FILE)
    else:
        found = [f for f in _files(path, storage) if f.count("/") == path.count("/") + 2]  # <run>/<dir>/state.pt
        if not found:
            raise FileNotFoundError(
                f"no checkpoint at {checkpoint}: expected a state.pt, a checkpoint directory holding one, or a run "
                "directory with checkpoint_* directories (run.storage_path/run.name of the job)"
            )
        state_file = max(found, key=lambda f: _mtime(f, storage))
    if not exists(state_file, storage):
        raise FileNotFoundError(f"no checkpoint at {state_file}: give a checkpoint directory or its state.pt")
    state = torch.load(io.BytesIO(read_bytes(state_file, storage)), map_location="cpu", weights_only=True)
    checkpoint_dir = state_file.rsplit("/", 1)[0]
    return CheckpointSource(state_file, checkpoint_dir.rsplit("/", 1)[0], state)


def _files(path: str, storage: StorageConfig) -> list[str]:
    if not is_s3(path) and not os.path.isdir(path):
        return []
    return [f for f in list_files(path, storage) if f.endswith(f"/{STATE_FILE}")]


def _mtime(uri: str, storage: StorageConfig) -> float:
    fs, path = resolve(uri, storage)
    mtime = fs.get_file_info(path).mtime
    return mtime.timestamp() if mtime is not None else 0.0


def checkpoint_job(source: CheckpointSource, config: str | None, storage: StorageConfig) -> JobConfig:
    """The job config of a checkpoint: ``config`` (a YAML file), else its run directory's ``config.yaml``."""
    path = config or join(source.run_dir, CONFIG_FILE)
    if not exists(path, storage):
        raise FileNotFoundError(
            f"no job config at {path}: give the job's config with --config (the resolved one is config.yaml in "
            "the run directory run.storage_path/run.name)"
        )
    return resolve_job_config(yaml.safe_load(read_bytes(path, storage)) or {})


def register_checkpoint(
    checkpoint: str,
    name: str | None = None,
    *,
    config: str | None = None,
    tracking_uri: str | None = None,
    storage: StorageConfig | None = None,
) -> tuple[str, str | None, str]:
    """Log and register the model of ``checkpoint`` (see :func:`find_checkpoint`) as the training export would
    (:func:`log_and_register`), into the job's MLflow run when it is known (the checkpoint's, else the run
    directory's ``mlflow_run_id``; a new run otherwise). ``name``: registered model name (default the config's);
    ``tracking_uri``: default the config's (unless its credentials were removed), else ``MLFLOW_TRACKING_URI``.
    Registering one run's checkpoint twice gives one version. Returns ``(model URI, version, run id)``."""
    storage = storage or StorageConfig()
    source = find_checkpoint(checkpoint, storage)
    job = checkpoint_job(source, config, storage)
    name = name or job.tracking.registered_model_name
    if not name:
        raise ValueError("no registered model name: give --name (the config's tracking.registered_model_name is null)")
    uri = tracking_uri or _config_uri(job.tracking.tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and job.tracking.tracking_uri:
        raise ValueError(
            f"the config's tracking URI {job.tracking.tracking_uri} had its credentials removed: give --tracking-uri "
            "or MLFLOW_TRACKING_URI"
        )
    job = replace(job, tracking=replace(job.tracking, tracking_uri=uri, registered_model_name=name))
    hooks: Mapping[str, Any] = source.state.get("hooks", {})
    run_id = hooks.get("MetricLogger", {}).get("mlflow_run_id") or existing_run_id(source.run_dir, storage)
    categories = hooks.get("ExportModel", {}).get("categories")
    if categories is None:  # a checkpoint written before the category map was saved in it
        from jobs.datasets import dataset_info

        categories = dataset_info(job.data.train, storage, with_gt=False).categories.to_dict()
    model = build_model(job.model)
    model.load_state_dict(source.state["model"])
    tracker = Tracker(replace(job.tracking, run_name=job.tracking.run_name or job.run.name))
    new_run = run_id is None
    if new_run:
        run_id = tracker.start(None)
        tracker.log_config(job.to_dict())
    else:
        tracker.attach(run_id)  # the job's run as it is: its status is left alone
    ap = hooks.get("EvaluationHook", {}).get("last_ap")
    model_uri, version = log_and_register(tracker, model, job, CategoryMap.from_dict(categories), ap)
    if new_run:
        tracker.end("FINISHED")
    return model_uri, version, str(run_id)


def _config_uri(uri: str | None) -> str | None:
    return uri if uri and MASK not in uri and "%2A%2A%2A" not in uri else None

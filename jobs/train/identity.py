"""Which job a run directory belongs to, and whether it has finished.

A run directory (``run.storage_path``/``run.name``) is a job's identity for Ray Train: starting a job there resumes
its weights, optimizer, iteration and MLflow run. So the directory records what the job *is*
(:data:`IDENTITY_FILE`: the resolved config less what may change on a resume, and the training set's fingerprint),
and a job that does not match is refused instead of silently continuing another job's run. What may change on a
resume (:data:`MAY_CHANGE`): the number of epochs (to train further), logging, evaluation and checkpoint cadence,
retries, resources per worker, dataset locations (their content is the fingerprint), storage and tracking settings.
The data layout (:data:`LAYOUT`: workers and images per worker) changes only when the job asks for it
(``run.resume_rescale``, :mod:`jobs.train.rescale`); the identity then records the new layout.

A job that ended records its result (:data:`RESULT_FILE`); starting it again with no more epochs returns that result
instead of reopening its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jobs.config import JobConfig
from jobs.mlflow.tracking import flatten_config
from pipeline.storage import StorageConfig, exists, join, read_bytes, write_bytes

IDENTITY_FILE = "identity.json"
RESULT_FILE = "result.json"
MAY_CHANGE: tuple[str, ...] = (
    "train.epochs",
    "train.log_every_iters",
    "train.eval_every_epochs",
    "train.eval_max_images",
    "train.checkpoint_every_iters",
    "train.keep_best",
    "train.max_consecutive_nan",
    "data.train",
    "data.val",
    "data.eval_batch_size",
    "data.rows_per_task",
    "data.storage",
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "scaling.gpus_per_worker",
    "run.storage_path",
    "run.max_failures",
    "run.resume_rescale",
    "tracking",
)
LAYOUT: tuple[str, ...] = ("scaling.num_workers", "data.batch_size")


class JobIdentityError(ValueError):
    """The run directory belongs to another job; the message names the differences and the way out."""


def identity(job: JobConfig, fingerprint: str) -> dict[str, Any]:
    """The flattened config keys that define ``job`` (dotted key -> value as text) and the dataset ``fingerprint``."""
    flat = flatten_config(job.to_dict())
    keys = {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in MAY_CHANGE)}
    digest = hashlib.sha256(json.dumps([keys, fingerprint], sort_keys=True, default=str).encode()).hexdigest()
    return {"config_hash": digest, "fingerprint": fingerprint, "config": keys}


def check_identity(run_dir: str, storage: StorageConfig, job: JobConfig, fingerprint: str) -> str | None:
    """Record ``job``'s identity in a new ``run_dir``; in an existing one, raise :class:`JobIdentityError` unless it
    matches. A run directory from before identities were recorded is adopted. A change of :data:`LAYOUT` alone
    passes when ``job.run.resume_rescale`` allows it: the new identity is recorded and a note returned."""
    path = join(run_dir, IDENTITY_FILE)
    mine = identity(job, fingerprint)
    if not exists(path, storage):
        _write(path, storage, mine)
        return None
    theirs = json.loads(read_bytes(path, storage))
    if theirs["config_hash"] == mine["config_hash"]:
        return None
    changed = sorted(
        k for k in set(mine["config"]) | set(theirs["config"]) if mine["config"].get(k) != theirs["config"].get(k)
    )
    same_job = theirs["fingerprint"] == mine["fingerprint"] and changed and set(changed) <= set(LAYOUT)
    if same_job and job.run.resume_rescale:
        _write(path, storage, mine)
        return ", ".join(f"{k}: {theirs['config'].get(k)} -> {mine['config'].get(k)}" for k in changed)
    shown = ", ".join(f"{k}: {theirs['config'].get(k)!r} -> {mine['config'].get(k)!r}" for k in changed[:6])
    if theirs["fingerprint"] != mine["fingerprint"]:
        shown = ", ".join(
            filter(None, [f"training set {theirs['fingerprint'][:12]} -> {mine['fingerprint'][:12]}", shown])
        )
    if same_job:
        raise JobIdentityError(
            f"{run_dir}: resuming with another data layout ({shown}) changes the total batch and the iterations per "
            "epoch, so the run would no longer follow its LR schedule. To resume with it anyway, the LR rescaled "
            "by the linear scaling rule, add run.resume_rescale=true; to resume as it was, keep "
            + " and ".join(f"{k}={theirs['config'].get(k)}" for k in changed)
            + "; to start a new run, give it another run.name."
        )
    raise JobIdentityError(
        f"{run_dir} holds another job (config {theirs['config_hash'][:12]}, this one {mine['config_hash'][:12]}): "
        f"{shown}{', …' if len(changed) > 6 else ''}. Starting this job there would continue that job's weights, "
        "optimizer and MLflow run. To start a new run, give it another run.name (or run.storage_path); to resume "
        f"that job, use its resolved config ({join(run_dir, 'config.yaml')})."
    )


def _write(path: str, storage: StorageConfig, ident: dict[str, Any]) -> None:
    write_bytes(path, json.dumps(ident, indent=1, sort_keys=True, default=str).encode(), storage)


def finished_result(run_dir: str, storage: StorageConfig, epochs: int) -> dict[str, Any] | None:
    """The recorded result of a job in ``run_dir`` that ended after at least ``epochs`` epochs, else ``None``."""
    path = join(run_dir, RESULT_FILE)
    if not exists(path, storage):
        return None
    result = json.loads(read_bytes(path, storage))
    return result if int(result.get("epochs", -1)) >= epochs else None


def record_result(run_dir: str, storage: StorageConfig, epochs: int, result: dict[str, Any]) -> None:
    """Record that the job in ``run_dir`` ended after ``epochs`` epochs with ``result`` (JSON-able values)."""
    write_bytes(join(run_dir, RESULT_FILE), json.dumps({**result, "epochs": epochs}, default=str).encode(), storage)

"""The training job on the driver: datasets, MLflow run, Ray Train ``TorchTrainer`` (Train V2), results.

Starting a job again with the same ``run.name`` and ``run.storage_path`` resumes it from its latest
checkpoint (Ray Train V2 restores from the run's storage) and continues the same MLflow run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.train
import yaml
from ray.data import DataContext, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.config import JobConfig
from jobs.console import RayConsole, follow_progress, is_tty
from jobs.datasets import DatasetInfo, dataset_info, drop_params, drop_summary, source_of
from jobs.mlflow.tracking import Tracker, TrackingConfig, end_run, ensure_tracking_store, run_tags, without_secrets
from jobs.redact import redact_config
from jobs.train.hooks import Hook
from jobs.train.identity import check_identity, finished_result, record_result
from jobs.train.lease import RunLease
from jobs.train.loop import WorkerArgs, num_iters_per_epoch, train_worker
from jobs.train.preflight import cluster_capacity, preflight
from jobs.train.progress import ProgressBoard
from jobs.train.shards import epoch_shards
from pipeline.storage import StorageConfig, exists, join, read_bytes, resolve, write_bytes
from pipeline.stream import StreamConfig, eval_dataset

RUN_ID_MARKER = "mlflow_run_id"  # next to the Ray Train run: the job's MLflow run id
CONFIG_FILE = "config.yaml"  # next to the Ray Train run: the resolved job config, secrets removed


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_id: str


class ValDataConfig(DataConfig):
    """``val`` split unequally so that every evaluation image is scored exactly once (``equal=True`` would drop
    the remainder). The training stream does not go through Ray Train: each epoch is built and split by an
    :class:`~jobs.train.shards.EpochShards` actor, so that it depends on the epoch alone."""

    def __init__(self) -> None:
        # The driver's DataContext options, passed explicitly: Ray Train's default copies them, the deprecated
        # exclude_resources included, and Ray Data then warns about it on every run.
        current = DataContext.get_current().execution_options
        options = ExecutionOptions(
            resource_limits=current.resource_limits,
            preserve_order=current.preserve_order,
            verbose_progress=current.verbose_progress,
        )
        super().__init__(datasets_to_split=[], execution_options=options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")
            for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output


def run_training(
    job: JobConfig,
    *,
    threads_per_worker: int | None = None,
    picture_path: str | None = None,
    callbacks: Sequence[UserCallback] = (),
    parent_run_id: str | None = None,
    console: RayConsole | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Run (or resume) ``job`` to completion on the current Ray cluster. ``picture_path``: also write the
    latest validation picture there (a path on the node of worker 0, e.g. for a local run). ``callbacks``:
    Ray Train callbacks of the run (e.g. Tune's ``TuneReportCallback`` in a sweep's trial).
    ``parent_run_id``: the job's MLflow run is created nested under that run (a sweep's). ``console``: draw
    training and evaluation progress bars here, Ray Train's INFO logs only to its files unless verbose
    (``None``: no bars, Ray Train's defaults). ``hooks``: extra :class:`~jobs.train.hooks.Hook` objects for every
    Train worker, called before the job's own (pickled to the workers)."""
    storage = job.data.storage
    train_info = dataset_info(job.data.train, storage, with_gt=False)  # only evaluation needs a ground truth
    val_info = dataset_info(job.data.val, storage) if job.data.val is not None else None
    cpus, autoscaling = cluster_capacity()
    preflight(job, train_info, val_info, cluster_cpus=cpus, autoscaling=autoscaling)
    print(drop_summary({"train": train_info, "val": val_info}), flush=True)
    stream = StreamConfig(augment=job.data.augment, seed=job.train.seed, rows_per_task=job.data.rows_per_task)
    datasets = {}  # the training stream is built per epoch by the EpochShards actor, from the loaded records
    if job.data.val is not None:
        datasets["val"] = eval_dataset(source_of(job.data.val, val_info), storage, stream)

    run_dir = join(job.run.storage_path, job.run.name)
    with RunLease(run_dir, storage) as lease:  # one job at a time in run_dir, from before anything is written there
        return _train_in(
            lease,
            run_dir,
            job,
            train_info,
            val_info,
            stream,
            datasets,
            threads_per_worker=threads_per_worker,
            picture_path=picture_path,
            callbacks=callbacks,
            parent_run_id=parent_run_id,
            console=console,
            hooks=hooks,
        )


def _train_in(
    lease: RunLease,
    run_dir: str,
    job: JobConfig,
    train_info: DatasetInfo,
    val_info: DatasetInfo | None,
    stream: StreamConfig,
    datasets: dict[str, Any],
    *,
    threads_per_worker: int | None,
    picture_path: str | None,
    callbacks: Sequence[UserCallback],
    parent_run_id: str | None,
    console: RayConsole | None,
    hooks: Sequence[Hook],
) -> TrainResult:
    """:func:`run_training` once it holds the ``lease`` on ``run_dir``; a job that lost it (another job took the
    run directory over) leaves the MLflow run and the result to that job."""
    storage = job.data.storage
    note = check_identity(run_dir, storage, job, train_info.fingerprint)
    if note is not None:
        print(f"{job.run.name}: resuming with another data layout ({note}), the LR rescaled", flush=True)
    done = finished_result(run_dir, storage, job.train.epochs)
    if done is not None:
        print(
            f"{job.run.name} finished already ({done['epochs']} epochs): val/AP "
            f"{done['metrics'].get('val/AP', float('nan')):.4f}, model {done['metrics'].get('model_uri')}, MLflow "
            f"run {done['run_id']}. Raise train.epochs to train it further, or give a new run.name to train anew.",
            flush=True,
        )
        return TrainResult(done["metrics"], done["checkpoint_path"], done["run_id"])
    job = replace(job, tracking=ensure_tracking_store(job.tracking))  # absolute URI for the workers
    drops = drop_params({"train": train_info, "val": val_info})
    run_id = job_run_id(
        job.tracking, run_dir, storage, job, train_info.fingerprint, parent_run_id=parent_run_id, params=drops
    )
    iters = num_iters_per_epoch(train_info.num_images, job.scaling.num_workers, job.data.batch_size)
    board = ProgressBoard.remote() if console is not None else None
    shards = epoch_shards(source_of(job.data.train, train_info), storage, stream, job.scaling.num_workers)
    args = WorkerArgs(
        job=replace(job, tracking=without_secrets(job.tracking)),  # Ray keeps train_loop_config: no credentials
        tracking_uri_ref=ray.put(job.tracking.tracking_uri),
        run_id=run_id,
        categories=train_info.categories.to_dict(),
        iters_per_epoch=iters,
        coco_gt_ref=ray.put(val_info.coco_gt) if val_info is not None else None,
        picture_path=os.path.abspath(picture_path) if picture_path else None,
        threads_per_worker=threads_per_worker,
        progress_board=board,
        hooks=tuple(hooks),
        run_dir=run_dir if run_dir.startswith("s3://") else os.path.abspath(run_dir),
        attempt=uuid.uuid4().hex,
        train_shards=shards,
    )
    filesystem, storage_path = run_storage(job.run.storage_path, storage)
    resources = {"CPU": job.scaling.cpus_per_worker}
    if job.scaling.use_gpu:
        resources["GPU"] = job.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=args,
        torch_config=TorchConfig(backend="nccl" if job.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level=console.train_log_level) if console is not None else None,
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.train.keep_best, checkpoint_score_attribute="val/AP", checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=ValDataConfig(),
    )
    print(
        f"training {job.run.name}: {train_info.num_images} images, {train_info.categories.num_classes} classes, "
        f"{job.scaling.num_workers} workers x {job.data.batch_size} images, {iters} iterations/epoch, "
        f"{job.train.epochs} epochs; MLflow run {run_id}",
        flush=True,
    )
    eval_images = 0 if val_info is None else min(val_info.num_images, job.train.eval_max_images or val_info.num_images)
    tty = console is not None and not console.verbose and is_tty()
    try:
        with follow_progress(board, eval_images=eval_images, tty=tty) if board is not None else nullcontext():
            result = trainer.fit()
    except ray.train.TrainingFailedError:  # the workers' error, or a killed worker that could not say so itself
        if not lease.lost:
            end_run(job.tracking, run_id, "FAILED")
        raise
    except KeyboardInterrupt:  # the same command resumes it
        if not lease.lost:
            end_run(job.tracking, run_id, "KILLED")
        raise
    finally:
        ray.kill(shards)
        if board is not None:
            ray.kill(board)
    path = result.checkpoint.path if result.checkpoint is not None else None
    metrics = dict(result.metrics or {})
    if not lease.lost:
        result_record = {"metrics": metrics, "checkpoint_path": path, "run_id": run_id}
        record_result(run_dir, storage, job.train.epochs, result_record)
    return TrainResult(metrics, path, run_id)


def job_run_id(
    tracking: TrackingConfig,
    run_dir: str,
    storage: StorageConfig,
    job: JobConfig,
    fingerprint: str,
    *,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """The job's MLflow run: created (params, config, tags) on the first start, its id and the resolved config
    (:data:`CONFIG_FILE`, as logged to MLflow) kept next to the Ray Train run so that a restarted job and
    recovered workers continue the same run. With ``parent_run_id`` the run is nested under that one (tag
    ``mlflow.parentRunId``). ``params``: more params of the run (e.g. the datasets' drop counts)."""
    existing = existing_run_id(run_dir, storage)
    if existing is not None:
        return existing
    tracker = Tracker(replace(tracking, run_name=tracking.run_name or job.run.name))
    run_id = tracker.start(None)
    tracker.log_config(job.to_dict())
    if params:
        tracker.log_params(params)
    extra = {"job_name": job.run.name, "storage_path": job.run.storage_path}
    if parent_run_id is not None:
        extra["mlflow.parentRunId"] = parent_run_id
    tracker.set_tags(run_tags(fingerprint, extra))
    # the resolved config beside the Ray run, as logged to MLflow (secrets removed)
    config_yaml = yaml.safe_dump(redact_config(job.to_dict()), sort_keys=False)
    write_bytes(join(run_dir, CONFIG_FILE), config_yaml.encode(), storage)
    write_bytes(join(run_dir, RUN_ID_MARKER), run_id.encode(), storage)
    return run_id


def existing_run_id(run_dir: str, storage: StorageConfig) -> str | None:
    """The MLflow run id kept in ``run_dir`` by :func:`job_run_id`, or ``None`` before the job's first start."""
    marker = join(run_dir, RUN_ID_MARKER)
    return read_bytes(marker, storage).decode().strip() if exists(marker, storage) else None


def run_storage(storage_path: str, storage: StorageConfig):
    """Ray Train's ``storage_path``/``storage_filesystem`` for local paths or ``s3://`` (custom endpoints too)."""
    if storage_path.startswith("s3://"):
        filesystem, path = resolve(storage_path, storage)
        return filesystem, path
    return None, os.path.abspath(storage_path)

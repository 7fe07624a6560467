"""The per-worker entry point of Ray Train (``train_loop_per_worker``): builds the model, the optimizer step,
the data and the hooks from :class:`WorkerArgs`, restores the latest checkpoint, and runs the
:class:`~jobs.train.trainer.Trainer`. The Ray calls are few and visible here and in the hooks:
``get_context``, ``get_device``, ``prepare_model``, ``get_dataset_shard``, ``get_checkpoint`` (and
``report`` in :class:`~jobs.train.checkpoint.Checkpointer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from jobs.config import JobConfig
from jobs.denormals import flush_denormals
from jobs.mlflow.buffered import BufferedTracker
from jobs.mlflow.tracking import Tracker
from jobs.train.checkpoint import Checkpointer, load_state
from jobs.train.evaluation import EvaluationHook, Evaluator
from jobs.train.export import ExportModel
from jobs.train.fatal import FATAL, record_fatal, refuse_after_fatal
from jobs.train.hooks import Hook
from jobs.train.optim_step import OptimizerStep, running_stats
from jobs.train.progress import MetricLogger, StepMeter, console
from jobs.train.rescale import layout_note, rescaled
from jobs.train.schedule import build_optimizer
from jobs.train.shards import worker_group_id
from jobs.train.trainer import Trainer
from model.build import build_criterion, build_model
from pipeline.categories import CategoryMap
from pipeline.stream import iter_train_batches

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class WorkerArgs:
    """What every Train worker gets from the driver.

    Args:
        job: the resolved job config, its tracking URI's credentials masked (Ray keeps this object and may write
            it out); ``tracking_uri_ref``: a Ray object reference to the real URI (:func:`worker_job`).
        run_id: the job's MLflow run (created by the driver; a checkpoint's wins on resume).
        categories: the dataset's :class:`~pipeline.categories.CategoryMap` as ``to_dict()``.
        iters_per_epoch: steps per epoch on every worker (:func:`num_iters_per_epoch`).
        coco_gt_ref: a Ray object reference to the validation COCO ground truth (``None``: no validation set).
        picture_path: also copy the latest validation picture here (on worker 0's node).
        threads_per_worker: torch intra-op threads (``None``: torch's default).
        progress_board: a :class:`~jobs.train.progress.ProgressBoard` for the driver's progress bars.
        hooks: extra hooks, called before the job's own at every point (e.g. a test's fault injection).
        run_dir: the job's run directory (absolute path or ``s3://`` URI) and ``attempt``: an id of this
            ``run_training`` call; with them, errors a retry cannot fix fail the job once (:mod:`jobs.train.fatal`).
        train_shards: the :class:`~jobs.train.shards.EpochShards` actor that hands each rank its shard of each
            epoch's training stream.
    """

    job: JobConfig
    run_id: str | None
    categories: dict[str, Any]
    iters_per_epoch: int
    coco_gt_ref: Any = None
    picture_path: str | None = None
    threads_per_worker: int | None = None
    progress_board: Any = None
    hooks: tuple[Hook, ...] = ()
    run_dir: str | None = None
    attempt: str | None = None
    train_shards: Any = None
    tracking_uri_ref: Any = None


def worker_job(args: WorkerArgs) -> JobConfig:
    """``args.job`` with its real tracking URI, from the object store (which nothing persists)."""
    if args.tracking_uri_ref is None:
        return args.job
    tracking = replace(args.job.tracking, tracking_uri=ray.get(args.tracking_uri_ref))
    return replace(args.job, tracking=tracking)


def train_worker(args: WorkerArgs) -> None:
    """Ray Train's per-worker function: :func:`train` once, unless this attempt already failed for good."""
    storage = args.job.data.storage
    if args.run_dir is None or args.attempt is None:
        return train(args)
    refuse_after_fatal(args.run_dir, storage, args.attempt)
    try:
        train(args)
    except FATAL as error:
        record_fatal(args.run_dir, storage, args.attempt, error)
        raise


def train(args: WorkerArgs) -> None:
    flush_denormals()  # before the first parallel op: the intra-op threads inherit it (jobs/denormals.py)
    job, train = worker_job(args), args.job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    if args.threads_per_worker:
        torch.set_num_threads(args.threads_per_worker)

    device = ray.train.torch.get_device()
    model = build_model(job.model)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    total_batch = job.data.batch_size * world
    optimizer, scheduler = build_optimizer(model, train, total_batch, args.iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=train.amp == "fp16" and device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optim_step = OptimizerStep(
        params,
        optimizer,
        scheduler,
        scaler,
        clip_norm=train.grad_clip_norm,
        max_consecutive=train.max_consecutive_nan,
        buffers=running_stats(model),
    )
    amp_dtype = AMP_DTYPES[train.amp] if device.type == "cuda" or train.amp == "bf16" else None

    criterion = build_criterion(job.model)
    categories = CategoryMap.from_dict(args.categories)
    # metrics and plots go through a queue: an MLflow outage slows nothing and ends nothing (jobs/mlflow/buffered.py)
    tracker = BufferedTracker(Tracker(job.tracking, enabled=rank == 0), warn=console)
    meter = StepMeter(train, args.iters_per_epoch, total_batch, enabled=rank == 0, board=args.progress_board)
    hooks = [*args.hooks, MetricLogger(meter, tracker, args.run_id, rank)]
    if job.data.val is not None:
        evaluator = Evaluator(
            job,
            categories,
            args.coco_gt_ref,
            tracker,
            rank=rank,
            device=device,
            amp=amp_dtype,
            picture_path=args.picture_path,
            board=args.progress_board,
            criterion=criterion,
        )
        hooks.append(EvaluationHook(evaluator, ray.train.get_dataset_shard("val")))
    layout = {"world_size": world, "batch_size": job.data.batch_size, "iters_per_epoch": args.iters_per_epoch}
    hooks += [
        ExportModel(job, categories, tracker, rank, args.run_dir),
        Checkpointer(train.checkpoint_every_iters, rank, layout),
    ]

    group = worker_group_id()

    def data(epoch: int):  # this rank's shard of the epoch: the same rows in the same order on every run
        shard = ray.get(args.train_shards.shard.remote(epoch, rank, group))
        seed, buffer = train.seed + rank, job.data.shuffle_buffer_size
        return iter_train_batches(
            shard, batch_size=job.data.batch_size, epoch=epoch, seed=seed, shuffle_buffer_size=buffer
        )

    trainer = Trainer(
        ddp_model,
        model,
        criterion,
        optim_step,
        data,
        hooks,
        epochs=train.epochs,
        iters_per_epoch=args.iters_per_epoch,
        device=device,
        amp_dtype=amp_dtype,
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # on the CPU: RNG states must stay there; weights and optimizer state go to the device on loading
            trainer.load_state_dict(resumable(load_state(directory, map_location="cpu"), layout, job, rank))
    if not trainer.rng_restored:  # per-rank sampling streams; a resumed rank continues its own
        torch.manual_seed(train.seed + 1000 * rank + trainer.progress.iteration)
    trainer.train()


def resumable(state: dict[str, Any], layout: dict[str, int], job: JobConfig, rank: int) -> dict[str, Any]:
    """Checkpoint ``state`` made to continue with this run's ``layout``: as it is when unchanged, rescaled
    (:mod:`jobs.train.rescale`) when the job allows it (``run.resume_rescale``), else a ``ValueError``."""
    old = state.get("layout")
    if old is None:  # a checkpoint from before layouts were saved: only its own layout can resume it
        if job.run.resume_rescale:
            raise ValueError(
                "the checkpoint does not record the workers and batch size it was trained with, so it cannot be "
                "rescaled: resume it with the scaling.num_workers and data.batch_size it had, without "
                "run.resume_rescale"
            )
        return state
    if old == layout:
        return state
    if not job.run.resume_rescale:
        raise ValueError(
            f"the checkpoint was trained with {old}, this run has {layout}: add run.resume_rescale=true to resume "
            "with the LR rescaled, or keep scaling.num_workers and data.batch_size as they were"
        )
    if rank == 0:
        console(layout_note(old, layout, job.train))
    return rescaled(state, old, layout, job.train)


def num_iters_per_epoch(num_images: int, num_workers: int, batch_size: int) -> int:
    """Equal step count on every worker: each trains on ``floor(images/worker / batch)`` full batches."""
    return max(1, math.floor(num_images // num_workers / batch_size))

"""The per-worker training loop (Ray Train ``train_loop_per_worker``). Reads top to bottom: build, restore,
then per epoch: train steps, evaluation, checkpoint; finally log the model. Ray calls are few and visible:
``get_context``, ``prepare_model``, ``get_device``, ``get_dataset_shard``, ``get_checkpoint``, ``report``."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from jobs.config import JobConfig
from jobs.denormals import flush_denormals
from jobs.mlflow.tracking import Tracker
from jobs.train.checkpoint import Progress, load_state, restore, save_state, temp_checkpoint_dir
from jobs.train.evaluation import Evaluator
from jobs.train.progress import StepMeter
from jobs.train.schedule import build_optimizer
from model.build import build_model
from pipeline.categories import CategoryMap
from pipeline.stream import iter_train_batches

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the job stops, its last good checkpoint is kept."""


def train_worker(config: dict[str, Any]) -> None:
    flush_denormals()  # before the first parallel op: the intra-op threads inherit it (jobs/denormals.py)
    job: JobConfig = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.train.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    if "threads_per_worker" in config:
        torch.set_num_threads(config["threads_per_worker"])

    device = ray.train.torch.get_device()
    model = build_model(job.model)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    iters_per_epoch: int = config["iters_per_epoch"]
    total_batch = job.data.batch_size * world
    optimizer, scheduler = build_optimizer(model, job.train, total_batch, iters_per_epoch)
    amp_dtype = AMP_DTYPES[job.train.amp] if device.type == "cuda" or job.train.amp == "bf16" else None
    scaler = torch.amp.GradScaler(device.type, enabled=job.train.amp == "fp16" and device.type == "cuda")

    progress, run_id = Progress(), config.get("mlflow_run_id")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory, map_location=device)
        progress = restore(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        run_id = state["mlflow_run_id"] or run_id
    torch.manual_seed(job.train.seed + 1000 * rank + progress.iteration)  # per-rank sampling streams

    tracker = Tracker(job.tracking, enabled=rank == 0)
    run_id = tracker.start(run_id)
    if checkpoint is not None and rank == 0:
        print(f"resumed from the checkpoint of iteration {progress.iteration} (epoch {progress.epoch})", flush=True)
        tracker.log_metrics({"train/resumed_from_iter": progress.iteration}, step=progress.iteration)
    categories = CategoryMap.from_dict(config["categories"])
    evaluator = Evaluator(
        job,
        categories,
        config.get("coco_gt_ref"),
        tracker,
        rank=rank,
        device=device,
        amp=amp_dtype,
        picture_path=config.get("picture_path"),
        board=config.get("progress_board"),
    )
    meter = StepMeter(job.train, iters_per_epoch, total_batch, enabled=rank == 0, board=config.get("progress_board"))
    train_shard = ray.train.get_dataset_shard("train")
    metrics: dict[str, float] = {}

    for epoch in range(progress.epoch, job.train.epochs):
        ddp_model.train()
        batches = iter_train_batches(
            train_shard,
            batch_size=job.data.batch_size,
            epoch=epoch,
            seed=job.train.seed + rank,
            shuffle_buffer_size=job.data.shuffle_buffer_size,
        )
        meter.start_epoch(epoch)
        for step, (images, targets) in enumerate(batches):
            if step < progress.batch_in_epoch or step >= iters_per_epoch:
                continue  # already trained on (resume) / beyond the epoch's equal share: consume, skip
            meter.data_ready()
            _maybe_fail(job, config, rank, progress.iteration)
            images = [img.to(device, non_blocking=True) for img in images]
            targets = [{k: v.to(device) for k, v in t.items() if k in ("boxes", "labels")} for t in targets]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = ddp_model(images, targets)
            loss = sum(losses.values())
            if progress.iteration in job.train.nan_at_iters:  # test hook
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if _all_finite(loss, device):
                scaler.unscale_(optimizer)
                if job.train.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                progress.consecutive_nan = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                progress.skipped_nan_steps += 1
                progress.consecutive_nan += 1
                if progress.consecutive_nan >= job.train.max_consecutive_nan:
                    tracker.end("FAILED")
                    raise NonFiniteLossError(
                        f"{progress.consecutive_nan} consecutive non-finite losses at iteration {progress.iteration} "
                        f"(epoch {epoch}); stopping. The last good checkpoint is kept in {job.run.storage_path}/"
                        f"{job.run.name}; lower train.base_lr or set train.grad_clip_norm and start the job again."
                    )
            scheduler.step()
            progress.iteration += 1
            progress.batch_in_epoch = step + 1
            logged = meter.step(losses, loss, optimizer.param_groups[0]["lr"], progress, device)
            if logged:
                tracker.log_metrics(logged, step=progress.iteration)
                metrics = {**metrics, **logged}  # every report carries the latest value of each metric
            if job.train.checkpoint_every_iters and progress.iteration % job.train.checkpoint_every_iters == 0:
                _report(metrics, progress, model, optimizer, scheduler, scaler, run_id, rank)

        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        if evaluator.due(epoch):
            val = evaluator.run(ddp_model, ray.train.get_dataset_shard("val"), step=progress.iteration)
            progress.last_ap = val["val/AP"]
            progress.best_ap = max(progress.best_ap, progress.last_ap)
            metrics = {**metrics, **val}
        if progress.epoch == job.train.epochs and rank == 0:
            metrics = {**metrics, **_log_model(tracker, model, job, categories, progress, run_id)}
            tracker.end("FINISHED")
        _report(metrics, progress, model, optimizer, scheduler, scaler, run_id, rank, score=progress.last_ap)


def _log_model(tracker: Tracker, model, job: JobConfig, categories: CategoryMap, progress: Progress, run_id) -> dict:
    """The final model as an MLflow pyfunc, registered; ``champion`` moves to it only if its AP is better."""
    logged = tracker.log_detector(
        model=model,
        model_cfg=job.model,
        categories=categories,
        resize_cfg=job.data.augment.resize,
        metrics={"AP": progress.last_ap} if progress.last_ap >= 0 else {},
        training_config=job.to_dict(),
    )
    model_uri, version = logged
    name = job.tracking.registered_model_name
    uri = f"models:/{name}/{version}" if version else model_uri
    return {"model_uri": uri, "run_uri": f"{job.tracking.tracking_uri} run {run_id}"}


def _all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (all ranks then skip or step together)."""
    flag = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _report(metrics, progress, model, optimizer, scheduler, scaler, run_id, rank, score: float = -1.0) -> None:
    """Checkpoint (rank 0 writes) and report; a barrier on every rank. ``score`` ranks it for keep-best."""
    report = {**metrics, "epoch": progress.epoch, "iteration": progress.iteration, "val/AP": score}
    if rank != 0:
        ray.train.report(report)
        return
    with temp_checkpoint_dir() as directory:
        save_state(
            directory,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            progress=progress,
            run_id=run_id,
        )
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _maybe_fail(job: JobConfig, config: dict[str, Any], rank: int, iteration: int) -> None:
    """Test hook: rank 0 dies (``os._exit``) once at ``train.fail_at_iter``; a marker file makes it once."""
    if job.train.fail_at_iter is None or rank != 0 or iteration != job.train.fail_at_iter:
        return
    marker = config["fail_marker"]
    if os.path.exists(marker):
        return
    _wait_for_registered_checkpoint(os.path.dirname(marker), job.train.checkpoint_every_iters, iteration)
    with open(marker, "w") as f:
        f.write(str(iteration))
    print(f"[test hook] worker {rank} exits at iteration {iteration}", flush=True)
    os._exit(1)


def _wait_for_registered_checkpoint(run_dir: str, every: int, iteration: int, timeout_s: float = 60.0) -> None:
    """Test hook helper: Ray Train registers a reported checkpoint asynchronously; a crash simulated right
    after ``report`` waits until the controller's snapshot lists it, so the test sees a deterministic restore."""
    if not every or iteration < every:
        return
    expected, path = iteration // every * every, os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                latest = json.load(f).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("iteration", -1) >= expected:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def num_iters_per_epoch(num_images: int, num_workers: int, batch_size: int) -> int:
    """Equal step count on every worker: each trains on ``floor(images/worker / batch)`` full batches."""
    return max(1, math.floor(num_images // num_workers / batch_size))

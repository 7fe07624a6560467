"""Step timing and progress: images/s, the fraction of time spent waiting for data, loss terms, LR, ETA.

Only rank 0 prints its progress lines, to its own stdout: the worker's log file (and the driver's console with
``--verbose``, where Ray forwards worker output). The driver's progress bars (:mod:`jobs.console`) are fed by
events that the workers post to a :class:`ProgressBoard` actor.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import ray
import torch

from jobs.config import TrainConfig
from jobs.mlflow.buffered import BufferedTracker
from jobs.train.hooks import Hook

if TYPE_CHECKING:
    from jobs.train.trainer import Trainer


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The driver's inbox of progress events (dicts with a ``phase``), posted by the workers with
    ``board.post.remote(event)`` and taken by the driver in order:

    * ``{"phase": "train", "iteration", "total", "epoch", "epochs", "loss"}`` (rank 0; loss smoothed),
    * ``{"phase": "eval", "step", "images"}`` (every rank, per batch: images just evaluated),
    * ``{"phase": "eval_done", "step", "AP", "AP50"}`` (rank 0).
    """

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


class StepMeter:
    """``start_epoch`` / ``data_ready`` (the batch arrived) / ``step`` (the step finished) -> metrics every
    ``log_every_iters`` iterations (averages over the interval), else ``{}``. With a ``board``
    (:class:`ProgressBoard`), rank 0 also posts its progress there at most every ``post_every_s`` seconds."""

    def __init__(
        self,
        cfg: TrainConfig,
        iters_per_epoch: int,
        total_batch: int,
        enabled: bool = True,
        board: Any = None,
        post_every_s: float = 1.0,
    ) -> None:
        self.cfg, self.iters_per_epoch, self.total_batch, self.enabled = cfg, iters_per_epoch, total_batch, enabled
        self.total_iters = cfg.epochs * iters_per_epoch
        self.board, self.post_every_s = board if enabled else None, post_every_s
        self._posted = 0.0
        self._loss: float | None = None  # exponential moving average, for the progress bar
        self._reset()
        self._last = time.perf_counter()
        self.epoch = 0

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0  # steps, taken or skipped
        self.stepped = 0  # steps taken
        self.wait = 0.0
        self.busy = 0.0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._last = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self._last
        self._last = now

    def step(self, trainer: Trainer) -> dict[str, float]:
        """The step of ``trainer`` finished: account for it. Loss terms average over the interval's taken steps
        (a skipped, non-finite step counts in the throughput only)."""
        now = time.perf_counter()
        self.busy += now - self._last
        self._last = now
        self.count += 1
        iteration, lr = trainer.progress.iteration, trainer.optim_step.lr
        if trainer.stepped:
            self.stepped += 1
            for key, value in {**trainer.losses, "loss": trainer.loss}.items():
                self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self._post(iteration, float(trainer.loss.detach()), now)
        if iteration % self.cfg.log_every_iters and iteration != self.total_iters:
            return {}
        elapsed = self.wait + self.busy
        metrics = {f"train/{k}": v / self.stepped for k, v in self.sums.items()}
        metrics["train/lr"] = lr
        metrics["train/images_per_s"] = self.count * self.total_batch / max(elapsed, 1e-9)
        metrics["train/data_wait_fraction"] = self.wait / max(elapsed, 1e-9)
        metrics["train/skipped_nan_steps"] = float(trainer.optim_step.skipped)
        if trainer.device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        if self.enabled:
            remaining = (self.total_iters - iteration) * elapsed / self.count
            loss = metrics.get("train/loss", float("nan"))
            console(
                f"epoch {self.epoch + 1}/{self.cfg.epochs} iter {iteration}/{self.total_iters} "
                f"loss {loss:.4f} lr {lr:.5f} {metrics['train/images_per_s']:.1f} img/s "
                f"data-wait {100 * metrics['train/data_wait_fraction']:.0f}% "
                f"ETA {datetime.timedelta(seconds=round(remaining))}"
            )
        self._reset()
        return metrics

    def _post(self, iteration: int, loss: float, now: float) -> None:
        if math.isfinite(loss):
            self._loss = loss if self._loss is None else 0.9 * self._loss + 0.1 * loss
        last = iteration == self.total_iters
        if self.board is None or (now - self._posted < self.post_every_s and not last):
            return
        self._posted = now
        loss = float("nan") if self._loss is None else self._loss
        event = {"phase": "train", "iteration": iteration, "total": self.total_iters}
        event |= {"epoch": self.epoch + 1, "epochs": self.cfg.epochs, "loss": loss}
        self.board.post.remote(event)


class MetricLogger(Hook):
    """Times every step (:class:`StepMeter`), logs the interval's metrics to the job's MLflow run (rank 0) and
    keeps the latest of each in ``trainer.metrics``. Starts the run (resuming ``run_id``) before training and
    marks it FAILED if training raises; its state is the run id."""

    def __init__(self, meter: StepMeter, tracker: BufferedTracker, run_id: str | None, rank: int) -> None:
        self.meter, self.tracker, self.run_id, self.rank = meter, tracker, run_id, rank

    def before_train(self, trainer: Trainer) -> None:
        self.run_id = self.tracker.start(self.run_id)
        if trainer.resumed and self.rank == 0:
            progress = trainer.progress
            console(f"resumed from the checkpoint of iteration {progress.iteration} (epoch {progress.epoch})")
            self.tracker.log_metrics({"train/resumed_from_iter": progress.iteration}, step=progress.iteration)

    def before_epoch(self, trainer: Trainer) -> None:
        self.meter.start_epoch(trainer.progress.epoch)

    def before_step(self, trainer: Trainer) -> None:
        self.meter.data_ready()

    def after_step(self, trainer: Trainer) -> None:
        logged = self.meter.step(trainer)
        if logged:
            self.tracker.log_metrics(logged, step=trainer.progress.iteration)
            trainer.metrics.update(logged)

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self.tracker.end("FAILED", timeout_s=60.0)  # a restarted worker group resumes the run (RUNNING again)

    def state_dict(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("mlflow_run_id") or self.run_id


def console(line: str) -> None:
    """Print one progress line from a Ray Train worker, once. Train V2 turns ``print`` into a log record and,
    when a library has wrapped ``sys.stdout``, also tees it there, so Ray forwarded each line twice; the
    process's own stdout is forwarded to the driver exactly once."""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)

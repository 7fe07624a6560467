"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One ``state.pt`` per checkpoint (rank 0 writes it; loaded with ``weights_only=True``): the trainer's
``state_dict`` (weights, optimizer step, progress, every hook's state, every rank's RNG states) and the data
layout it was trained with (world size, batch size, iterations per epoch: :func:`jobs.train.rescale.rescaled`
reads it when a resume changes them). The :class:`Checkpointer`
hook reports it to Ray Train, which persists the directory to the run's storage (local or ``s3://``) and hands
the latest one back to a restarted worker group (``ray.train.get_checkpoint``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train
import torch

from jobs.train.hooks import Hook
from jobs.train.trainer import gather_rng_states

if TYPE_CHECKING:
    from jobs.train.trainer import Trainer

STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``directory/state.pt``."""
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)


def temp_checkpoint_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dhrcnn-ckpt-")


class Checkpointer(Hook):
    """Reports to Ray Train every ``every_iters`` iterations (0: never mid-epoch), after every epoch and at the end
    of training, with the latest metrics and a checkpoint that rank 0 writes; every rank reports (and sends rank 0
    its RNG states). A report's ``val/AP`` ranks its checkpoint for keep-best: the latest AP at an epoch's end, -1
    mid-epoch. While a non-finite streak is open the report carries no checkpoint, so a restart never resumes
    inside one. ``layout``: ``{"world_size", "batch_size", "iters_per_epoch"}``, saved with the state."""

    def __init__(self, every_iters: int, rank: int, layout: dict[str, int] | None = None) -> None:
        self.every_iters, self.rank, self.layout = every_iters, rank, layout or {}

    def after_step(self, trainer: Trainer) -> None:
        if self.every_iters and trainer.progress.iteration % self.every_iters == 0:
            self.report(trainer, score=-1.0)

    def after_epoch(self, trainer: Trainer) -> None:
        if not trainer.last_epoch_done:  # the last one is reported after training, with the exported model
            self.report(trainer, score=trainer.metrics.get("val/AP", -1.0))

    def after_train(self, trainer: Trainer) -> None:
        self.report(trainer, score=trainer.metrics.get("val/AP", -1.0))

    def report(self, trainer: Trainer, score: float) -> None:
        progress = trainer.progress
        report = {**trainer.metrics, "epoch": progress.epoch, "iteration": progress.iteration, "val/AP": score}
        rng = gather_rng_states()  # on every rank
        if self.rank != 0 or trainer.optim_step.consecutive:
            ray.train.report(report)
            return
        with temp_checkpoint_dir() as directory:
            save_state(directory, {**trainer.state_dict(rng), "layout": self.layout})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))

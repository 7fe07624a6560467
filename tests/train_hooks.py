"""Test-only trainer hooks (:mod:`jobs.train.hooks`) that drive the real failure paths from outside the product:
a Train worker that stops and publishes its pid so that the test can SIGKILL it, inputs that make the forward
pass non-finite, and a record of the weights that a checkpoint holds and a restarted worker group restores.

They reach the Ray workers pickled by value (:func:`register`), since the workers do not import ``tests``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray.cloudpickle
import ray.train
import torch

from jobs.train.hooks import Hook


def register() -> None:
    """Ship this module's hooks to Ray workers by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _rank() -> int:
    return ray.train.get_context().get_world_rank()


class StopForKill(Hook):
    """Rank 0, before the step that follows ``iteration`` steps: writes its pid to ``pid_file`` and waits to be
    killed (the file exists afterwards, so the restarted worker group passes by)."""

    def __init__(self, iteration: int, pid_file: str | Path, timeout_s: float = 600.0) -> None:
        self.iteration, self.pid_file, self.timeout_s = iteration, str(pid_file), timeout_s

    def before_step(self, trainer) -> None:
        if _rank() != 0 or trainer.progress.iteration != self.iteration or os.path.exists(self.pid_file):
            return
        tmp = f"{self.pid_file}.tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, self.pid_file)
        time.sleep(self.timeout_s)
        raise RuntimeError(f"StopForKill: nobody killed pid {os.getpid()} within {self.timeout_s} s")


class NonFiniteImages(Hook):
    """Replaces the images of the steps that follow ``iterations`` steps (every rank) with float NaN images of
    the same shape: the forward pass and the loss become non-finite, as with corrupt inputs."""

    def __init__(self, iterations: tuple[int, ...]) -> None:
        self.iterations = tuple(iterations)

    def before_step(self, trainer) -> None:
        if trainer.progress.iteration in self.iterations:
            images, targets = trainer.batch
            trainer.batch = ([torch.full(img.shape, float("nan")) for img in images], targets)


class RecordWeights(Hook):
    """Rank 0 appends ``{"event", "iteration", "digest"}`` lines to ``path``: ``start`` when a worker group
    starts training (after any restore), ``step`` after each step; the digest is a sha256 of the weights."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def before_train(self, trainer) -> None:
        self._write(trainer, "start")

    def after_step(self, trainer) -> None:
        self._write(trainer, "step")

    def _write(self, trainer, event: str) -> None:
        if _rank() != 0:
            return
        digest = hashlib.sha256()
        for name, tensor in trainer.module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        line = {"event": event, "iteration": trainer.progress.iteration, "digest": digest.hexdigest()}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


class RecordBatches(Hook):
    """Every rank appends ``{"rank", "epoch", "iteration", "images"}`` to ``path`` after each step: the image ids
    of the batch that step trained on (``iteration`` counts the steps done, this one included)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def after_step(self, trainer) -> None:
        _, targets = trainer.batch
        line = {
            "rank": _rank(),
            "epoch": trainer.progress.epoch,
            "iteration": trainer.progress.iteration,
            "images": [int(t["image_id"]) for t in targets],
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def kill_when_checkpointed(pid_file: Path, run_dir: Path, iteration: int, timeout_s: float = 600.0) -> threading.Thread:
    """A thread that waits for ``pid_file`` and for Ray Train to have registered the checkpoint of
    ``iteration`` in ``run_dir``, then SIGKILLs the pid. Ray Train's controller registers a reported
    checkpoint asynchronously; its run snapshot (``checkpoint_manager_snapshot.json``, a Ray internal read
    here only) says when, so the restore the test expects is deterministic."""

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pid_file.exists() and _checkpointed(run_dir) >= iteration:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _checkpointed(run_dir: Path) -> int:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return -1
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("iteration", -1))

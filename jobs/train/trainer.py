"""The per-worker trainer: epochs of data -> forward -> loss -> optimizer step, with hooks around each step.

Knows nothing of Ray or MLflow: the hooks (checkpoint reports, evaluation, metric logging, model export) and
the data source (a function of the epoch) are passed in. ``state_dict`` is everything a resumed run needs:
weights, the optimizer step's state, progress, every hook's state and the RNG states.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from jobs.train.hooks import Hook
from jobs.train.optim_step import OptimizerStep

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


@dataclass
class Progress:
    """Where training stands. ``batch_in_epoch`` counts the batches of ``epoch`` already trained on."""

    epoch: int = 0
    iteration: int = 0
    batch_in_epoch: int = 0


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU, and the current CUDA device's), numpy and Python RNG states as
    weights-only-loadable values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order. A collective: every rank of the process group calls it."""
    _, world = rank_and_world()
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


class Trainer:
    """Trains ``model`` from ``progress`` to the end of epoch ``epochs``.

    Args:
        model: the detector as trained (e.g. DDP-wrapped); ``module`` is the bare one (saved in checkpoints).
        criterion: training-mode model outputs -> ``{name: scalar loss}``.
        optim_step: backward, skip policy, clipping, optimizer and LR step (:class:`OptimizerStep`).
        data: ``epoch -> iterable of (images, targets)``: uint8 ``[3, H, W]`` images and targets with ``boxes``
            ``[N, 4]`` float xyxy (input pixels) and ``labels`` ``[N]`` int64 in 1..K.
        hooks: called in this order at each point (:mod:`jobs.train.hooks`).
        iters_per_epoch: steps per epoch (equal on every rank); the rest of an epoch's batches are consumed, unused.
        amp_dtype: autocast dtype for forward and loss (``None``: float32).
    """

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        criterion: Callable[[Any], dict[str, Tensor]],
        optim_step: OptimizerStep,
        data: Callable[[int], Iterable[Batch]],
        hooks: Sequence[Hook],
        *,
        epochs: int,
        iters_per_epoch: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.module, self.criterion, self.optim_step = model, module, criterion, optim_step
        self.data, self.hooks = data, list(hooks)
        self.epochs, self.iters_per_epoch, self.device, self.amp_dtype = epochs, iters_per_epoch, device, amp_dtype
        self.progress = Progress()
        self.resumed = False
        self.rng_restored = False  # this rank's RNG states came from the checkpoint
        self.metrics: dict[str, Any] = {}  # the latest value of every metric, reported with each checkpoint
        self.batch: Batch | None = None
        self.losses: dict[str, Tensor] = {}
        self.loss: Tensor | None = None
        self.stepped = False

    def train(self) -> None:
        self._call("before_train")
        try:
            while self.progress.epoch < self.epochs:
                self._call("before_epoch")
                for index, batch in enumerate(self.data(self.progress.epoch)):
                    if index < self.progress.batch_in_epoch or index >= self.iters_per_epoch:
                        continue  # trained on before the resume / beyond the epoch's equal share: consumed, unused
                    self.batch = batch
                    self._call("before_step")
                    self.run_step()
                    self.progress.iteration += 1
                    self.progress.batch_in_epoch = index + 1
                    self._call("after_step")
                self.progress.epoch += 1
                self.progress.batch_in_epoch = 0
                self._call("after_epoch")
            self._call("after_train")
        except BaseException as error:
            for hook in self.hooks:
                hook.on_exception(self, error)
            raise

    def run_step(self) -> None:
        """One iteration on ``self.batch``: forward, loss, optimizer step."""
        images, targets = self.batch
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: t[k].to(self.device) for k in ("boxes", "labels")} for t in targets]
        self.optim_step.begin()
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            self.losses = self.criterion(self.model(images, targets))
        self.loss = sum(self.losses.values())
        self.stepped = self.optim_step.step(self.loss)

    @property
    def last_epoch_done(self) -> bool:
        return self.progress.epoch == self.epochs

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Weights, optimizer step, progress, hooks' states (by name), RNG states per rank (``rng``: every rank's,
        from :func:`gather_rng_states`; ``None``: this process's only): ``torch.load``-able with
        ``weights_only=True``."""
        return {
            "model": self.module.state_dict(),
            "optim_step": self.optim_step.state_dict(),
            "progress": asdict(self.progress),
            "hooks": {hook.name: state for hook in self.hooks if (state := hook.state_dict())},
            "rng": rng if rng is not None else [rng_state()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; this rank takes its own RNG states (``rng_restored`` says whether there
        were any: a checkpoint of fewer ranks has none for the new ones)."""
        self.module.load_state_dict(state["model"])
        self.optim_step.load_state_dict(state["optim_step"])
        self.progress = Progress(**state["progress"])
        for hook in self.hooks:
            if hook.name in state["hooks"]:
                hook.load_state_dict(state["hooks"][hook.name])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict: one process's
        rank, _ = rank_and_world()
        self.rng_restored = rank < len(rngs)
        if self.rng_restored:
            set_rng_state(rngs[rank])
        self.resumed = True

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self)

"""Resuming a run with another data layout: a different number of Train workers or images per worker.

Refused unless the job asks for it (``run.resume_rescale: true``, checked on the driver by
:func:`jobs.train.identity.check_identity`), because the run no longer does what it did: the total batch changes,
so the LR is rescaled by the linear scaling rule (:func:`jobs.train.schedule.scaled_lr`), and the iterations per
epoch change, so the schedule's iteration is mapped to the same point of the same epoch. The interrupted epoch
goes on at the same fraction of its batches, in the new layout's order: some of its images may be seen twice or
not at all. Epochs after it are exact again.
"""

from __future__ import annotations

import copy
from typing import Any

from jobs.config import TrainConfig
from jobs.train.schedule import lr_factor, scaled_lr

LAYOUT_KEYS = ("world_size", "batch_size", "iters_per_epoch")


def layout_note(old: dict[str, int], new: dict[str, int], cfg: TrainConfig) -> str:
    """One line saying what a resume from layout ``old`` to ``new`` changes."""
    old_lr = scaled_lr(cfg, old["world_size"] * old["batch_size"])
    new_lr = scaled_lr(cfg, new["world_size"] * new["batch_size"])
    return (
        f"resuming with {new['world_size']} workers x {new['batch_size']} images (was {old['world_size']} x "
        f"{old['batch_size']}), as run.resume_rescale asks: LR {old_lr:g} -> {new_lr:g} (train.base_lr "
        f"{cfg.base_lr:g} at {cfg.base_batch_size} images, linear scaling); the interrupted epoch goes on at the same "
        "fraction of its batches in the new layout's order (some of its images may be seen twice or not at all)"
    )


def rescaled(state: dict[str, Any], old: dict[str, int], new: dict[str, int], cfg: TrainConfig) -> dict[str, Any]:
    """A copy of checkpoint ``state`` (:meth:`jobs.train.trainer.Trainer.state_dict`) trained with layout ``old``,
    made to continue with layout ``new``: progress mapped to the same fraction of the same epoch, the LR schedule
    rescaled to the new total batch and set to its value at the mapped iteration."""
    state = copy.deepcopy(state)
    progress = state["progress"]
    fraction = progress["batch_in_epoch"] / old["iters_per_epoch"]
    batch = min(round(fraction * new["iters_per_epoch"]), new["iters_per_epoch"])
    iteration = progress["epoch"] * new["iters_per_epoch"] + batch
    progress.update(batch_in_epoch=batch, iteration=iteration)

    base = scaled_lr(cfg, new["world_size"] * new["batch_size"])
    lr = base * lr_factor(iteration, cfg, new["iters_per_epoch"])
    optim = state["optim_step"]
    for group in optim["optimizer"]["param_groups"]:
        group.update(initial_lr=base, lr=lr)
    scheduler = optim["scheduler"]
    groups = len(scheduler["base_lrs"])
    scheduler.update(base_lrs=[base] * groups, last_epoch=iteration, _last_lr=[lr] * groups)
    return state

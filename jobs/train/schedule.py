"""Per-iteration learning-rate schedule: linear warm-up, then steps at epochs (×gamma) or cosine.

A pure function of the iteration, so resuming at iteration ``i`` gives exactly the LR the schedule
predicts there; ``torch.optim.lr_scheduler.LambdaLR`` applies it and its state is checkpointed.
"""

from __future__ import annotations

import bisect
import math

import torch

from jobs.config import TrainConfig


def scaled_lr(cfg: TrainConfig, total_batch_size: int) -> float:
    """Linear scaling rule: ``base_lr · total_batch / base_batch`` (0.02 at 16 images -> 0.0025 at 2)."""
    return cfg.base_lr * total_batch_size / cfg.base_batch_size


def lr_factor(iteration: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """Multiplier of the scaled LR at ``iteration`` (0-based, counted over the whole run)."""
    total = cfg.epochs * iters_per_epoch
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    else:
        factor = cfg.gamma ** bisect.bisect_right([s * iters_per_epoch for s in cfg.steps], iteration)
    if iteration < cfg.warmup_iters:  # mmdet LinearLR: from warmup_ratio to 1 over warmup_iters
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * alpha
    return factor


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total_batch_size: int, iters_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum, weight decay on every trainable parameter, as mmdet) and its per-iteration schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=scaled_lr(cfg, total_batch_size), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg, iters_per_epoch))
    return optimizer, scheduler

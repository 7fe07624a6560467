"""One optimizer step: backward, the non-finite policy, AMP loss scaling, gradient clipping, SGD, the LR schedule.

The step is taken only if the loss, and the gradient norm where it is measured, are finite on every rank (an
all-reduced flag, so that the ranks of a DDP group skip or step together); otherwise the gradients are dropped
and the step is counted as skipped; the BatchNorm running statistics that the step's forward pass updated are put back
too (:meth:`OptimizerStep.begin`), so that a skipped step leaves the model exactly as it was (a NaN batch would
otherwise poison the statistics for good). ``max_consecutive`` skipped steps in a row stop the job with
:class:`NonFiniteLossError`. With fp16 on a GPU the ``GradScaler`` keeps its own overflow handling (an overflowed
step is skipped by the scaler and its scale lowered; that is not a non-finite step here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps: the job stops, its last good checkpoint is kept."""


class OptimizerStep:
    """``step(loss) -> bool`` (stepped or skipped) for ``optimizer`` over ``params``; ``state_dict`` holds the
    optimizer, scheduler and scaler states and the skip counters, everything a resumed run needs.

    Args:
        params: the trainable parameters (those of ``optimizer``), for the gradient norm.
        optimizer, scheduler: the optimizer and its per-iteration LR schedule (stepped once per call, taken or
            skipped, so that the LR stays a function of the iteration).
        scaler: the AMP ``GradScaler`` (disabled unless fp16 on a GPU).
        clip_norm: clip the gradients' global L2 norm to this value (``None``: no clipping).
        max_consecutive: this many skipped steps in a row raise :class:`NonFiniteLossError`.
        buffers: tensors that a forward pass updates in place (:func:`running_stats`), restored on a skipped step.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        *,
        clip_norm: float | None,
        max_consecutive: int,
        buffers: list[Tensor] = (),
    ) -> None:
        self.params, self.optimizer, self.scheduler, self.scaler = params, optimizer, scheduler, scaler
        self.clip_norm, self.max_consecutive = clip_norm, max_consecutive
        self.buffers = list(buffers)
        self._saved = [b.detach().clone() for b in self.buffers]
        self.skipped = 0  # steps skipped in the whole run
        self.consecutive = 0  # skipped steps in a row, up to the last one

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def begin(self) -> None:
        """Before the step's forward pass: remember the ``buffers`` that a skipped step puts back."""
        if self.buffers:
            torch._foreach_copy_(self._saved, self.buffers)

    def step(self, loss: Tensor) -> bool:
        """Backward ``loss`` (a scalar), then take the step if it is finite everywhere. Returns whether it was
        taken. The gradient norm is measured (and checked) when clipping, or when no ``GradScaler`` checks the
        gradients (fp32, bf16): a finite loss can still give infinite gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # a no-op when the scaler is disabled
        finite = torch.isfinite(loss.detach().float())
        check_norm = not self.scaler.is_enabled()  # the scaler checks the gradients itself
        if self.clip_norm is not None or check_norm:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            if check_norm:
                finite = finite & torch.isfinite(norm)
            if self.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, norm)
        stepped = _on_every_rank(finite)
        if stepped:
            self.scaler.step(self.optimizer)
            self.consecutive = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.buffers:
                torch._foreach_copy_(self.buffers, self._saved)
            self.skipped += 1
            self.consecutive += 1
        self.scaler.update()  # after unscale_, taken or not (a non-finite step lowers the fp16 scale)
        self.scheduler.step()
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient norm; stopping"
            )
        return stepped

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "skipped": self.skipped,
            "consecutive": self.consecutive,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


def running_stats(model: torch.nn.Module) -> list[Tensor]:
    """The running statistics that ``model``'s training-mode BatchNorm layers update in every forward pass
    (``running_mean``, ``running_var``, ``num_batches_tracked``); frozen BatchNorm has none."""
    norms = (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    return [b for m in norms if m.track_running_stats for b in m.buffers(recurse=False) if b is not None]


def _on_every_rank(flag: Tensor) -> bool:
    """Whether ``flag`` (a 0-d bool tensor) is true on every rank of the process group (itself alone without one)."""
    value = flag.reshape(1).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)

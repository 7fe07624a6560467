"""The extension points of the :class:`~jobs.train.trainer.Trainer` (detectron2's ``HookBase``).

The trainer calls every hook at fixed points, in list order: ``before_train``, then per epoch ``before_epoch``,
per step ``before_step`` / ``after_step``, ``after_epoch``; finally ``after_train`` (or ``on_exception`` when
training raises). A hook reads and writes the trainer's public attributes (``progress``, ``batch``, ``losses``,
``loss``, ``stepped``, ``metrics``). A hook with state returns it from ``state_dict``; the trainer saves it in
every checkpoint under the hook's ``name`` and gives it back through ``load_state_dict`` on resume.

The job's own hooks live next to their concept: :class:`jobs.train.progress.MetricLogger`,
:class:`jobs.train.evaluation.EvaluationHook`, :class:`jobs.train.export.ExportModel`,
:class:`jobs.train.checkpoint.Checkpointer`. Callers can add theirs (``run_training(hooks=...)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.train.trainer import Trainer


class Hook:
    """Does nothing at every point; subclasses override what they need."""

    @property
    def name(self) -> str:
        """The key of this hook's state in a checkpoint."""
        return type(self).__name__

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_epoch(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

"""The end of training: the final model logged to the job's MLflow run as a pyfunc and registered; the run
marked FINISHED. ``champion`` moves to the new version only if its AP is better (:mod:`jobs.mlflow.registry`).

The registration is the one tracking step allowed to fail a job. When it fails, the final weights are written to
``<run dir>/unregistered_model/state.pt`` and the error gives the command that registers them later
(``dhrcnn models register``, :func:`jobs.train.register.register_checkpoint`), which logs and registers exactly as
the export does (:func:`log_and_register`).
"""

from __future__ import annotations

import io
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from jobs.config import JobConfig
from jobs.mlflow.buffered import BufferedTracker
from jobs.mlflow.tracking import Tracker
from jobs.redact import redact_url
from jobs.train.checkpoint import STATE_FILE
from jobs.train.hooks import Hook
from pipeline.categories import CategoryMap
from pipeline.storage import join, write_bytes

if TYPE_CHECKING:
    from jobs.train.trainer import Trainer

UNREGISTERED_DIR = "unregistered_model"  # in the run directory: the final weights of a failed registration


class ExportError(RuntimeError):
    """The final model could not be logged or registered; the message says where its weights are and how to
    register them later. Fatal (:mod:`jobs.train.fatal`): the job fails once, it is not trained again."""


def log_and_register(
    tracker: Tracker | BufferedTracker,
    model: torch.nn.Module,
    job: JobConfig,
    categories: CategoryMap,
    ap: float | None,
) -> tuple[str, str | None]:
    """Log ``model`` into the tracker's run as the detector pyfunc and register it under
    ``job.tracking.registered_model_name`` (once per run: a run that registered a version already gets that one
    back). ``ap``: the val AP recorded with it (``None`` or negative: none). Returns ``(model URI, version)``."""
    logged = tracker.log_detector(
        model=model,
        model_cfg=job.model,
        categories=categories,
        resize_cfg=job.data.augment.resize,
        metrics={"AP": ap} if ap is not None and ap >= 0 else {},
        training_config=job.to_dict(),
        once_per_run=True,  # a worker group restarted after this export finds its version
    )
    assert logged is not None, "log_and_register: the tracker must be enabled"
    return logged


class ExportModel(Hook):
    """After training, on rank 0: log and register ``trainer.module`` with the last evaluation's AP
    (``trainer.metrics["val/AP"]``, none without an evaluation); ``model_uri`` and ``run_uri`` (its password and
    secret query values masked) join the metrics. Its state: the dataset's category map, so that a checkpoint
    can be registered on its own (:func:`jobs.train.register.register_checkpoint`). ``run_dir``: where the final
    weights go when the registration fails (``None``: a temporary folder)."""

    def __init__(
        self,
        job: JobConfig,
        categories: CategoryMap,
        tracker: BufferedTracker,
        rank: int,
        run_dir: str | None = None,
    ) -> None:
        self.job, self.categories, self.tracker, self.rank, self.run_dir = job, categories, tracker, rank, run_dir

    def after_train(self, trainer: Trainer) -> None:
        if self.rank != 0:
            return
        try:
            model_uri, version = log_and_register(
                self.tracker, trainer.module, self.job, self.categories, trainer.metrics.get("val/AP")
            )
        except Exception as err:  # MLflow unreachable, a failing registry: say how to finish the job later
            raise self.failure(trainer, err) from None  # the cause's text, redacted, is in the message
        name = self.job.tracking.registered_model_name
        uri = f"models:/{name}/{version}" if version else model_uri
        where = redact_url(str(self.job.tracking.tracking_uri))
        trainer.metrics.update({"model_uri": uri, "run_uri": f"{where} run {self.tracker.run_id}"})
        self.tracker.end("FINISHED")

    def failure(self, trainer: Trainer, err: Exception) -> ExportError:
        """Write the final state beside the run and describe the failure with the command that registers it."""
        storage = self.job.data.storage
        folder = join(self.run_dir, UNREGISTERED_DIR) if self.run_dir else tempfile.mkdtemp(prefix="dhrcnn-final-")
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        write_bytes(join(folder, STATE_FILE), buffer.getvalue(), storage)
        name = self.job.tracking.registered_model_name or "NAME"
        cause = redact_url(f"{type(err).__name__}: {err}")[:2000]
        return ExportError(
            f"the final model could not be logged to MLflow or registered ({cause}). The trained weights are saved "
            f"in {folder}; once MLflow answers, register them with:\n"
            f"  dhrcnn models register --checkpoint {folder} --name {name}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"categories": self.categories.to_dict()}

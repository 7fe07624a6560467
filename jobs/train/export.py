"""The end of training: the final model logged to the job's MLflow run as a pyfunc and registered; the run
marked FINISHED. ``champion`` moves to the new version only if its AP is better (:mod:`jobs.mlflow.registry`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.config import JobConfig
from jobs.mlflow.buffered import BufferedTracker
from jobs.train.hooks import Hook
from pipeline.categories import CategoryMap

if TYPE_CHECKING:
    from jobs.train.trainer import Trainer


class ExportModel(Hook):
    """After training, on rank 0: log and register ``trainer.module`` with the last evaluation's AP
    (``trainer.metrics["val/AP"]``, none without an evaluation); ``model_uri`` and ``run_uri`` join the metrics."""

    def __init__(self, job: JobConfig, categories: CategoryMap, tracker: BufferedTracker, rank: int) -> None:
        self.job, self.categories, self.tracker, self.rank = job, categories, tracker, rank

    def after_train(self, trainer: Trainer) -> None:
        if self.rank != 0:
            return
        ap = trainer.metrics.get("val/AP", -1.0)
        logged = self.tracker.log_detector(
            model=trainer.module,
            model_cfg=self.job.model,
            categories=self.categories,
            resize_cfg=self.job.data.augment.resize,
            metrics={"AP": ap} if ap >= 0 else {},
            training_config=self.job.to_dict(),
            once_per_run=True,  # a worker group restarted after this export finds its version
        )
        model_uri, version = logged
        name = self.job.tracking.registered_model_name
        uri = f"models:/{name}/{version}" if version else model_uri
        trainer.metrics.update(
            {"model_uri": uri, "run_uri": f"{self.job.tracking.tracking_uri} run {self.tracker.run_id}"}
        )
        self.tracker.end("FINISHED")

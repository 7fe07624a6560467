"""Evaluation during training: inference sharded across workers, detections gathered, COCOeval on rank 0,
the numbers broadcast back so every rank reports the same metrics; plots and a picture logged to MLflow."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
import torch.distributed as dist

from jobs.config import JobConfig
from jobs.evaluate.coco_eval import STAT_NAMES, evaluate_coco
from jobs.evaluate.plots import draw_detections_grid, per_class_table, plot_pr_curves
from jobs.evaluate.predictor import Predictor, predict_coco
from jobs.train.hooks import Hook
from jobs.train.progress import console
from pipeline.categories import CategoryMap
from pipeline.stream import iter_eval_batches

if TYPE_CHECKING:
    from jobs.train.trainer import Trainer


class Evaluator:
    """``run(model, shard, step) -> {"val/AP": ..., ..., "val/loss": ..., "val/loss_rpn_cls": ...}`` on every rank
    (collective: all ranks call it). With a ``criterion``, the loss of the same forward passes joins the metrics
    (the model in eval mode: frozen BN statistics, test-time proposal counts, sampled RoIs). With a
    ``board`` (:class:`jobs.train.progress.ProgressBoard`) every rank posts its progress there, rank 0 the result."""

    def __init__(
        self,
        job: JobConfig,
        categories: CategoryMap,
        coco_gt_ref,
        tracker,
        *,
        rank: int,
        device,
        amp,
        picture_path: str | None = None,
        board=None,
        criterion=None,
    ):
        self.job, self.categories, self.coco_gt_ref, self.tracker = job, categories, coco_gt_ref, tracker
        self.rank, self.device, self.amp, self.picture_path = rank, device, amp, picture_path
        self.board, self.criterion = board, criterion

    def due(self, epoch: int) -> bool:
        every = self.job.train.eval_every_epochs
        has_val = self.job.data.val is not None
        return has_val and every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == self.job.train.epochs)

    def run(self, model: torch.nn.Module, shard, step: int) -> dict[str, float]:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        limit = self.job.train.eval_max_images
        samples: list[tuple] = []
        # Looks through the DDP wrapper (shards differ in length); batches eval_batch_size images of one padded
        # shape on a GPU, one image per pass on CPU.
        max_batch = None if torch.device(self.device).type == "cpu" else self.job.data.eval_batch_size
        predictor = Predictor(
            model,
            self.job.data.augment.resize,
            device=self.device,
            amp_dtype=self.amp,
            max_batch=max_batch,
            criterion=self.criterion,
        )
        detections, image_ids = predict_coco(
            predictor,
            iter_eval_batches(shard, batch_size=self.job.data.eval_batch_size),
            self.categories,
            max_images=None if limit is None else math.ceil(limit / world),
            samples=samples if self.rank == 0 else None,
            on_batch=None if self.board is None else lambda n: self._post("eval", step=step, images=n),
        )
        mine = (detections, image_ids, predictor.loss_sums, predictor.loss_images)
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        stats: list[Any] = [None]
        if self.rank == 0:
            all_dets = [d for dets, *_ in gathered for d in dets]
            all_ids = sorted({i for _, ids, *_ in gathered for i in ids})
            stats[0] = {**self._score_and_log(all_dets, all_ids, samples, step), **self._loss(gathered, step)}
            self._post("eval_done", step=step, AP=stats[0]["val/AP"], AP50=stats[0]["val/AP50"])
        if world > 1:
            dist.broadcast_object_list(stats, src=0)
        return stats[0]

    def _loss(self, gathered: list[tuple], step: int) -> dict[str, float]:
        """``val/loss`` and its terms: the criterion's mean over every validation image of every rank."""
        images = sum(n for *_, n in gathered)
        if not images:
            return {}
        keys = {k for _, _, sums, _ in gathered for k in sums}
        out = {f"val/{k}": sum(sums.get(k, 0.0) for _, _, sums, _ in gathered) / images for k in sorted(keys)}
        self.tracker.log_metrics(out, step=step)
        return out

    def _post(self, phase: str, **values: Any) -> None:
        if self.board is not None:
            self.board.post.remote({"phase": phase, **values})

    def _score_and_log(self, detections: list[dict], image_ids: list[int], samples: list[tuple], step: int) -> dict:
        gt = ray.get(self.coco_gt_ref) if isinstance(self.coco_gt_ref, ray.ObjectRef) else self.coco_gt_ref
        metrics = evaluate_coco(gt, detections, image_ids=image_ids, class_names=list(self.categories.names))
        out = {f"val/{k}": float(metrics.stats[k]) for k in STAT_NAMES}
        self.tracker.log_metrics(out, step=step)
        try:
            self._log_pictures(metrics, samples, step)
        except Exception as err:  # a picture is not worth a run: the numbers above are logged
            console(f"warning: the evaluation pictures of iteration {step} failed: {type(err).__name__}: {err}")
        console(f"evaluation at iteration {step}: " + " ".join(f"{k}={metrics.stats[k]:.4f}" for k in STAT_NAMES))
        return out

    def _log_pictures(self, metrics, samples: list[tuple], step: int) -> None:
        """The precision-recall plot, the per-class table and the predictions picture, logged under
        ``eval/step_<step>`` (and the picture copied to ``picture_path``)."""
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            plot_pr_curves(metrics, str(tmp_path / "pr_curve.png"))
            (tmp_path / "per_class_ap.md").write_text(per_class_table(metrics))
            draw_detections_grid(
                [s[0] for s in samples],
                [s[1] for s in samples],
                [s[2] for s in samples],
                list(self.categories.names),
                str(tmp_path / "val_predictions.png"),
            )
            for name in ("pr_curve.png", "per_class_ap.md", "val_predictions.png"):
                self.tracker.log_artifact(str(tmp_path / name), f"eval/step_{step:07d}")
            if self.picture_path:  # a local copy of the latest picture (the quickstart prints its path)
                Path(self.picture_path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp_path / "val_predictions.png", self.picture_path)


class EvaluationHook(Hook):
    """Evaluates on the ``val`` shard after the epochs :meth:`Evaluator.due` names (every rank: collective);
    the metrics join ``trainer.metrics``. Its state: the latest and the best AP."""

    def __init__(self, evaluator: Evaluator, shard) -> None:
        self.evaluator, self.shard = evaluator, shard
        self.last_ap, self.best_ap = -1.0, -1.0

    def after_epoch(self, trainer: Trainer) -> None:
        if not self.evaluator.due(trainer.progress.epoch - 1):
            return
        val = self.evaluator.run(trainer.model, self.shard, step=trainer.progress.iteration)
        self.last_ap = val["val/AP"]
        self.best_ap = max(self.best_ap, self.last_ap)
        trainer.metrics.update(val)

    def state_dict(self) -> dict[str, float]:
        return {"last_ap": self.last_ap, "best_ap": self.best_ap}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.last_ap, self.best_ap = float(state["last_ap"]), float(state["best_ap"])

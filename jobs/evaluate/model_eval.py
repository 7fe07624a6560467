"""Score a trained model on a dataset: a registered/logged MLflow model or a model file, over the same
evaluation stream and COCOeval as training (``dhrcnn evaluate --model ... --data ...``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.config import DatasetSpec
from jobs.datasets import dataset_info, source_of
from jobs.evaluate.coco_eval import CocoMetrics, evaluate_coco
from jobs.evaluate.predictor import Predictor, predict_coco
from pipeline.categories import CategoryMap
from pipeline.storage import StorageConfig
from pipeline.stream import StreamConfig, eval_dataset, iter_eval_batches
from pipeline.transforms import AugmentConfig, ResizeConfig


@dataclass(frozen=True)
class LoadedDetector:
    """A torch detector (eval mode), the evaluation resize it was trained with, and its category map
    (``None`` for model files without one: the dataset's map is used, label k = k-th category by id)."""

    model: torch.nn.Module
    resize: ResizeConfig
    categories: CategoryMap | None


def load_for_eval(model_uri: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedDetector:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model`` (our pyfunc), or a model file
    written by ``dhrcnn import-mmdet`` / :func:`model.checkpoint.save_model`."""
    if Path(model_uri).is_file():
        from model.checkpoint import load_model

        model, _, meta = load_model(model_uri, map_location=device)
        resize = ResizeConfig(**meta["resize"]) if "resize" in meta else ResizeConfig()
        return LoadedDetector(model, resize, None)
    from jobs.mlflow.pyfunc_model import load_detector, unwrap
    from jobs.mlflow.registry import check_detector

    if model_uri.startswith("models:/"):
        check_detector(model_uri, tracking_uri)  # the flavour, and the weights' hash the registry recorded
    inner = unwrap(load_detector(model_uri, tracking_uri=tracking_uri, device=device))
    return LoadedDetector(inner.detector, inner.resize, inner.categories)


def evaluate_model(
    detector: LoadedDetector,
    data: DatasetSpec,
    storage: StorageConfig,
    *,
    batch_size: int = 4,
    max_images: int | None = None,
    device: str = "cpu",
) -> tuple[CocoMetrics, list[dict[str, Any]]]:
    """COCO metrics and the detections (COCO results, original pixels) of ``detector`` on ``data``."""
    info = dataset_info(data, storage)
    categories = detector.categories or info.categories
    unknown = sorted(set(categories.category_ids) - set(info.categories.category_ids))
    if unknown:
        raise ValueError(
            f"the model predicts category ids {unknown[:5]} that the dataset does not define "
            f"({list(info.categories.category_ids)[:10]}...): evaluate it on a dataset with its categories"
        )
    stream = StreamConfig(augment=AugmentConfig(resize=detector.resize), shuffle_files=False)
    batches = iter_eval_batches(eval_dataset(source_of(data), storage, stream), batch_size=batch_size)
    max_batch = None if torch.device(device).type == "cpu" else batch_size  # on CPU one image per pass (fastest)
    predictor = Predictor(detector.model, detector.resize, device=device, max_batch=max_batch)
    detections, image_ids = predict_coco(predictor, batches, categories, max_images=max_images)
    metrics = evaluate_coco(info.coco_gt, detections, image_ids=sorted(set(image_ids)))
    return metrics, detections

"""Batched inference for evaluation: detections mapped back to original-image pixels and category ids."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from jobs.coco_eval import detections_to_coco
from pipeline.categories import CategoryMap
from pipeline.collate import unscale_boxes


@torch.no_grad()
def predict_coco(
    model: torch.nn.Module,
    batches: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]],
    categories: CategoryMap,
    device: torch.device,
    *,
    max_images: int | None = None,
    amp_dtype: torch.dtype | None = None,
    samples: list[tuple] | None = None,
    num_samples: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run ``model`` (eval mode) over collated evaluation batches.

    Returns COCO results (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``) and
    the ids of the images processed. ``batches`` is always consumed to the end (Ray Data shards must be);
    images beyond ``max_images`` are skipped. If ``samples`` is a list, the first ``num_samples`` images are
    appended to it as ``(HWC uint8 image, (gt boxes, gt labels), (boxes, scores, labels))`` in resized pixels.
    ``on_batch(n)`` is called after each batch with the number of images it held (progress).
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for images, targets in batches:
        if max_images is not None and len(image_ids) >= max_images:
            continue
        images = [img.to(device, non_blocking=True) for img in images]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        for img, out, target in zip(images, outputs, targets, strict=True):
            if samples is not None and len(samples) < num_samples:
                samples.append(
                    (
                        img.permute(1, 2, 0).cpu().numpy(),
                        (target["boxes"].numpy(), target["labels"].numpy()),
                        (out["boxes"].float().cpu().numpy(), out["scores"].cpu().numpy(), out["labels"].cpu().numpy()),
                    )
                )
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            boxes = unscale_boxes(out["boxes"].float().cpu(), target)
            results.extend(
                detections_to_coco(image_id, boxes, out["scores"].cpu(), out["labels"].cpu(), categories.category_id_of)
            )
        if on_batch is not None:
            on_batch(len(images))
    model.train(was_training)
    return results, image_ids

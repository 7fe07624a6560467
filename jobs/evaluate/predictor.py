"""The one inference path: images -> the detector -> detections in original-image pixels.

Training-time evaluation and ``dhrcnn evaluate`` (:func:`predict_coco`), the ``dhrcnn predict`` actors and the
MLflow model all go through :class:`Predictor`, so a detector gives the same boxes whichever of them runs it.

**Detections do not depend on the batch.** The detector pads the images of a batch with zeros to the batch's
largest size (rounded up to ``size_divisible``); the padding changes the features near each image's right and
bottom border, so padding an image further than it would be padded alone changes its detections (measured on
six COCO photographs with an imported mmdetection R-50: 96 of 200 detections matched mmdetection through a
4-image padded batch, 200 of 200 one image at a time). The Predictor therefore batches only images whose padded
shapes are equal (:func:`padded_shape`), which pads none of them further than alone; on COCO most images pad
to one of a few shapes (800x1216, 1216x800, ...), so the batches stay full. What batching equal shapes can still
change is float rounding: convolution kernels may pick another algorithm for another batch size (measured on
CPU with a tiny model: backbone features 1.7e-5 apart between batch 1 and 2, detections 3.1e-5 px and 2.7e-7 in
score). ``max_batch=1`` gives bit-identical results whatever the input, and is the default on CPU, where it is
also the fastest (``benchmarks/predictor.py``, 2 cores, 24 COCO-shaped images: one per pass 1.45 images/s,
grouped batches of 4 1.17, padded batches of 4 0.89).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jobs.evaluate.coco_eval import detections_to_coco
from pipeline.categories import CategoryMap
from pipeline.collate import unscale_boxes
from pipeline.transforms import ResizeConfig, eval_transform

GPU_BATCH = 4  # images per forward pass on accelerators unless told otherwise


@dataclass(frozen=True)
class Detections:
    """Detections of one image in ORIGINAL-image pixels.

    Attributes:
        boxes: float64 ``[D, 4]`` xyxy, in pixels of the image as decoded (EXIF applied, before the resize).
        scores: float32 ``[D]``, descending.
        labels: int64 ``[D]`` in 1..K (0 = background is never returned).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def above(self, score_thresh: float) -> Detections:
        """The detections scoring at least ``score_thresh``."""
        keep = self.scores >= score_thresh
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])

    def to_coco(self, image_id: int, categories: CategoryMap) -> list[dict[str, Any]]:
        """COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
        return detections_to_coco(image_id, self.boxes, self.scores, self.labels, categories.category_id_of)

    def to_row(self, categories: CategoryMap) -> dict[str, list]:
        """``{"boxes": [[x1, y1, x2, y2], ...], "scores", "labels", "category_ids", "category_names"}`` of Python
        numbers: the MLflow model's output row and, with the boxes flattened, ``dhrcnn predict``'s table row."""
        labels = [int(label) for label in self.labels]
        return {
            "boxes": self.boxes.tolist(),
            "scores": [float(s) for s in self.scores],
            "labels": labels,
            "category_ids": [categories.category_id_of(label) for label in labels],
            "category_names": [categories.name_of(label) for label in labels],
        }


def padded_shape(height: int, width: int, divisor: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to multiples of ``divisor``: the detector's input size of this image alone."""
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def shape_batches(shapes: Sequence[tuple[int, int]], divisor: int, max_batch: int) -> list[list[int]]:
    """Indices of ``shapes`` (``(H, W)`` of resized images) in batches of at most ``max_batch`` images of one
    padded shape, groups in order of first appearance, indices ascending within each."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(shapes):
        groups.setdefault(padded_shape(h, w, divisor), []).append(i)
    return [ids[k : k + max_batch] for ids in groups.values() for k in range(0, len(ids), max_batch)]


class Predictor:
    """A detector (put in eval mode) with its evaluation resize: RGB images or already-resized inputs in,
    :class:`Detections` in original pixels out, batched by padded shape (see the module docstring).

    Args:
        detector: a :class:`model.detector.DoubleHeadRCNN` (or any module with its input/output contract and a
            ``transform.size_divisible``); DDP / ``torch.compile`` wrappers are looked through.
        resize: the evaluation resize the detector was trained with (used by :meth:`__call__` only; resized
            inputs come from the data pipeline with their scale factors).
        device: where the detector runs. amp_dtype: autocast dtype (``None``: float32).
        max_batch: images per forward pass, at most; ``None``: 1 on CPU (exact and fastest there, see the module
            docstring), :data:`GPU_BATCH` on other devices.
        criterion: also score each pass against its targets' ``boxes`` and ``labels`` (crowd boxes left out) with
            this criterion (:func:`model.build.build_criterion`), from the same forward pass: the validation loss.
            Its terms accumulate in :attr:`loss_sums` (each pass's mean × its images) over :attr:`loss_images`.
    """

    def __init__(
        self,
        detector: torch.nn.Module,
        resize: ResizeConfig,
        *,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
        max_batch: int | None = None,
        criterion: Callable[[Any], dict[str, Tensor]] | None = None,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        module = getattr(detector, "module", detector)  # DistributedDataParallel
        self.detector = getattr(module, "_orig_mod", module)  # torch.compile
        self.resize = resize
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.max_batch = max_batch or (1 if self.device.type == "cpu" else GPU_BATCH)
        self.divisor = int(getattr(getattr(self.detector, "transform", None), "size_divisible", 32))
        self.criterion = criterion
        self.loss_sums: dict[str, float] = {}
        self.loss_images = 0

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of RGB uint8 ``[H, W, 3]`` images (as decoded), in their order."""
        inputs = [self.preprocess(image) for image in images]
        return self.detect([t for t, _ in inputs], [m for _, m in inputs])

    def preprocess(self, image: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        """The evaluation resize of RGB uint8 ``[H, W, 3]`` ``image``: uint8 ``[3, h, w]`` and the collate-style
        target keys that map boxes back (``scale_factor``, ``orig_size``, ``flipped``)."""
        transformed = eval_transform(image, np.zeros((0, 4), np.float32), self.resize)
        tensor = torch.tensor(transformed.image).permute(2, 0, 1)  # a copy: the array may be read-only
        sx, sy = transformed.scale_factor
        meta = {
            "scale_factor": torch.tensor([sx, sy], dtype=torch.float32),  # as collate's (and mmdet's)
            "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64),
            "flipped": torch.tensor(False),
        }
        return tensor, meta

    def detect(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> list[Detections]:
        """Detections of resized uint8 ``[3, h, w]`` ``images`` (what :func:`pipeline.collate.collate` or
        :meth:`preprocess` gives), boxes mapped back with each target's ``scale_factor``/``orig_size``/``flipped``;
        in input order."""
        if len(images) != len(targets):
            raise ValueError(f"detect: {len(images)} images but {len(targets)} targets")
        found: list[Detections | None] = [None] * len(images)
        for batch in shape_batches([tuple(img.shape[-2:]) for img in images], self.divisor, self.max_batch):
            detections = self._forward([images[i] for i in batch], [targets[i] for i in batch])
            for i, det in zip(batch, detections, strict=True):
                found[i] = det
        return found  # type: ignore[return-value]  # every index is in exactly one batch

    def detect_stream(
        self, batches: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]], *, max_pending: int | None = None
    ) -> Iterator[tuple[Tensor, dict[str, Tensor], Detections]]:
        """``(image, target, detections)`` for every image of collated ``batches`` (an evaluation stream),
        regrouped across batches so that forward passes hold ``max_batch`` images of one padded shape.

        Images wait per padded shape until their group is full; when more than ``max_pending`` (default
        ``4 * max_batch``) wait, the largest group runs. Yields in the order the images ran, not arrived.
        """
        limit = max_pending if max_pending is not None else 4 * self.max_batch
        pending: dict[tuple[int, int], list[tuple[Tensor, dict[str, Tensor]]]] = {}
        for images, targets in batches:
            for image, target in zip(images, targets, strict=True):
                key = padded_shape(*image.shape[-2:], self.divisor)
                pending.setdefault(key, []).append((image, target))
                if len(pending[key]) >= self.max_batch:
                    yield from self._run_group(pending.pop(key))
            while sum(len(group) for group in pending.values()) > limit:
                yield from self._run_group(pending.pop(max(pending, key=lambda k: len(pending[k]))))
        for key in list(pending):
            yield from self._run_group(pending.pop(key))

    def _run_group(
        self, group: list[tuple[Tensor, dict[str, Tensor]]]
    ) -> Iterator[tuple[Tensor, dict[str, Tensor], Detections]]:
        for start in range(0, len(group), self.max_batch):
            chunk = group[start : start + self.max_batch]
            detections = self._forward([img for img, _ in chunk], [t for _, t in chunk])
            for (image, target), det in zip(chunk, detections, strict=True):
                yield image, target, det

    @torch.inference_mode()
    def _forward(self, images: list[Tensor], targets: list[Mapping[str, Tensor]]) -> list[Detections]:
        was_training = self.detector.training
        self.detector.eval()
        amp = self.amp_dtype is not None
        inputs = [img.to(self.device, non_blocking=True) for img in images]
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
                if self.criterion is not None:
                    gt = [self._loss_target(t, img) for t, img in zip(targets, images, strict=True)]
                    outputs, raw = self.detector(inputs, gt)
                    self._add_losses(self.criterion(raw), len(images))
                else:
                    outputs = self.detector(inputs)
        finally:
            self.detector.train(was_training)
        return [
            Detections(
                unscale_boxes(out["boxes"].float().cpu(), target, dtype=torch.float64).numpy(),
                out["scores"].float().cpu().numpy(),
                out["labels"].cpu().numpy(),
            )
            for out, target in zip(outputs, targets, strict=True)
        ]

    def _loss_target(self, target: Mapping[str, Tensor], image: Tensor) -> dict[str, Tensor]:
        """The boxes a training target would hold: crowd boxes, boxes of no area and boxes outside the image (which
        evaluation keeps, and the detector refuses as targets) left out."""
        boxes, (h, w) = target["boxes"], image.shape[-2:]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 0] < w) & (boxes[:, 1] < h)
        keep &= (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
        if "iscrowd" in target:
            keep &= ~target["iscrowd"]
        return {"boxes": boxes[keep].to(self.device), "labels": target["labels"][keep].to(self.device)}

    def _add_losses(self, losses: Mapping[str, Tensor], images: int) -> None:
        for key, value in {**losses, "loss": sum(losses.values())}.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + float(value) * images
        self.loss_images += images


def predict_coco(
    predictor: Predictor,
    batches: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]],
    categories: CategoryMap,
    *,
    max_images: int | None = None,
    samples: list[tuple] | None = None,
    num_samples: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run ``predictor`` over collated evaluation batches (:func:`pipeline.stream.iter_eval_batches`).

    Returns COCO results (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``) and the
    ids of the images processed. ``batches`` is always consumed to the end (Ray Data shards must be); images
    beyond ``max_images`` are skipped. If ``samples`` is a list, the first ``num_samples`` images run are
    appended to it as ``(HWC uint8 image, (gt boxes, gt labels), (boxes, scores, labels))`` in resized pixels.
    ``on_batch(n)`` is called with the number of images detected since its last call (progress).
    """
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    reported = 0

    def report() -> None:
        nonlocal reported
        if on_batch is not None and len(image_ids) > reported:
            on_batch(len(image_ids) - reported)
            reported = len(image_ids)

    def admitted() -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
        taken = 0
        for images, targets in batches:
            report()
            keep = len(images) if max_images is None else max(0, min(len(images), max_images - taken))
            taken += keep
            if keep:
                yield images[:keep], targets[:keep]

    for image, target, det in predictor.detect_stream(admitted()):
        image_id = int(target["image_id"])
        image_ids.append(image_id)
        results.extend(det.to_coco(image_id, categories))
        if samples is not None and len(samples) < num_samples:
            sx, sy = (float(v) for v in target["scale_factor"])
            resized_boxes = det.boxes * np.array([sx, sy, sx, sy])
            samples.append(
                (
                    image.permute(1, 2, 0).cpu().numpy(),
                    (target["boxes"].numpy(), target["labels"].numpy()),
                    (resized_boxes, det.scores, det.labels),
                )
            )
    report()
    return results, image_ids

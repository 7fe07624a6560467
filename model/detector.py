"""The detector: torchvision's ``GeneralizedRCNN`` over our backbone, RPN and Double-Head RoI heads. It
returns raw outputs; :class:`model.criterion.DetectionCriterion` computes the losses.

Input contract (spec §1.1, issue 2 §5): a list of ``[3, H, W]`` RGB images, uint8 or float in 0–255,
already resized by the data pipeline. The model normalises with ImageNet mean/std ×255 and pads to a
multiple of 32 with zeros after normalisation; it never resizes. Targets per image: ``boxes [N, 4]``
float xyxy in input pixels and ``labels [N]`` int64 in 1..K (N may be 0). Detections per image:
``boxes [D, 4]`` float32 xyxy in input pixels, ``scores [D]``, ``labels [D]`` in 1..K.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from model.outputs import DetectorOutputs
from model.roi_heads import DoubleHeadRoIHeads
from model.rpn import MMDetRPN
from model.transform import NormalizePad

Detections = list[dict[str, Tensor]]


class DoubleHeadRCNN(GeneralizedRCNN):
    """``forward(images, targets=None)``; what it returns depends on the mode:

    * training mode (``targets`` required): :class:`~model.outputs.DetectorOutputs`, the RPN's maps and the box
      head's outputs on the sampled RoIs with their sampled targets. ``criterion(outputs)`` gives the losses.
    * eval mode, no ``targets``: the detections, a list (one per image) of dicts ``boxes``, ``scores``,
      ``labels``.
    * eval mode with ``targets``: ``(detections, DetectorOutputs)`` from the same pass, the detections identical
      to those without targets. This is what a validation loss is made of: ``criterion(outputs)`` under
      ``torch.no_grad()``. Such a loss is the training objective of the *eval-mode* network: BatchNorm uses its
      frozen running statistics (nothing updates them), the RPN keeps its test-time pre/post-NMS proposal counts
      and the RPN targets are assigned on this pass's anchors; the RoI targets are sampled, as in training,
      from these proposals plus the gt boxes (the box head runs a second time, on those sampled RoIs). The
      samplers draw from torch's global generator, as in training.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: MMDetRPN,
        roi_heads: DoubleHeadRoIHeads,
        transform: NormalizePad,
        num_classes: int,
        channels_last: bool = False,
    ) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> DetectorOutputs | Detections | tuple[Detections, DetectorOutputs]:
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        validate_inputs(images, targets, self.num_classes)
        image_list, features = self.features(images)
        sizes = image_list.image_sizes
        rpn = self.rpn(image_list, features, targets)
        if self.training:
            return DetectorOutputs(rpn=rpn, roi=self.roi_heads(features, rpn.proposals, sizes, targets))
        dense = self.roi_heads(features, rpn.proposals, sizes)
        detections = self.roi_heads.postprocess(dense.head, dense.rois, sizes)
        if targets is None:
            return detections
        return detections, DetectorOutputs(rpn=rpn, roi=self.roi_heads(features, rpn.proposals, sizes, targets))

    def features(self, images: list[Tensor]):
        """``(ImageList, FPN feature dict)`` for ``images``: the shared first step of every stage."""
        image_list, _ = self.transform(images)
        batch = image_list.tensors
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return image_list, self.backbone(batch)


def validate_inputs(images: list[Tensor], targets: list[dict[str, Tensor]] | None, num_classes: int) -> None:
    """Raise ``ValueError`` naming the image index and the field for malformed images or targets."""
    if not isinstance(images, list | tuple) or len(images) == 0:
        raise ValueError("images: expected a non-empty list of [3, H, W] tensors")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise ValueError(f"images[{i}]: expected a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}]: expected shape [3, H, W] (RGB, channels first), got {list(img.shape)}")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise ValueError(f"images[{i}]: expected dtype uint8 or float (0-255), got {img.dtype}")
        if img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"images[{i}]: empty image of shape {list(img.shape)}")
        if img.is_floating_point() and 0.0 < float(img.max()) <= 1.0:
            raise ValueError(
                f"images[{i}]: float values lie in 0-1; the model expects 0-255 (uint8 or float), "
                "as it normalises with ImageNet mean/std x255"
            )
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"targets: expected {len(images)} dicts (one per image), got {len(targets)}")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor):
            raise ValueError(f"targets[{i}]['boxes']: missing or not a tensor")
        if not isinstance(labels, Tensor):
            raise ValueError(f"targets[{i}]['labels']: missing or not a tensor")
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes']: expected shape [N, 4] (xyxy), got {list(boxes.shape)}")
        if not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes']: expected a float tensor, got {boxes.dtype}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{i}]['boxes']: contains NaN or infinite values")
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"targets[{i}]['labels']: expected shape [{boxes.shape[0]}] to match boxes, got {list(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"targets[{i}]['labels']: expected an integer tensor, got {labels.dtype}")
        if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(
                f"targets[{i}]['labels']: values must lie in 1..{num_classes} (0 is background), "
                f"got min {int(labels.min())} max {int(labels.max())}"
            )
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.where(bad)[0][0])
            raise ValueError(f"targets[{i}]['boxes'][{j}]: box {boxes[j].tolist()} has no positive width and height")
        h, w = images[i].shape[-2:]
        outside = (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
        if outside.any():
            j = int(torch.where(outside)[0][0])
            raise ValueError(f"targets[{i}]['boxes'][{j}]: box {boxes[j].tolist()} lies outside the {w}x{h} image")

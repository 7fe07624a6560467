"""Criteria: the detector's raw outputs and sampled targets (:mod:`model.outputs`) -> weighted loss terms.

``DetectionCriterion(rpn=RPNCriterion(), roi=RoICriterion())(model(images, targets))`` gives the loss dict
to sum and backpropagate; the same call on the ``DetectorOutputs`` of an eval-mode pass with targets gives a
validation loss. :func:`model.build.build_criterion` builds the one that matches a config's head. The loss
functions themselves (:mod:`model.losses`) stay callable on their own.

Every term is a 0-d float32 tensor (float64 for a float64 model), computed as in mmdet 3.x: RPN sigmoid CE
+ L1 over the sampled anchors normalised by Σ_images max(#pos, 1) + max(#neg, 1); R-CNN terms normalised by
the number of sampled RoIs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor
from torchvision.models.detection.rpn import concat_box_prediction_layers

from model.losses import double_head_ext_losses, double_head_losses, rpn_losses
from model.outputs import DetectorOutputs, RoIOutputs, RoITargets, RPNOutputs, RPNTargets


def _rpn_targets(out: RPNOutputs) -> RPNTargets:
    if out.targets is None:
        raise ValueError("RPN outputs carry no targets: run the model with targets to compute losses")
    return out.targets


def _roi_targets(out: RoIOutputs) -> RoITargets:
    if out.targets is None:
        raise ValueError("RoI outputs carry no targets: run the model with targets to compute losses")
    return out.targets


@dataclass(frozen=True, kw_only=True)
class RPNCriterion:
    """``loss_rpn_cls`` = ``cls_weight`` · sigmoid CE, ``loss_rpn_bbox`` = ``reg_weight`` · L1 (mmdet RPN)."""

    cls_weight: float = 1.0
    reg_weight: float = 1.0

    def __call__(self, out: RPNOutputs) -> dict[str, Tensor]:
        t = _rpn_targets(out)
        objectness, deltas = concat_box_prediction_layers(out.objectness, out.deltas)  # [B·A, 1], [B·A, 4]
        avg_factor = sum(
            max(int(p.sum()), 1) + max(int(n.sum()), 1) for p, n in zip(t.sampled_pos, t.sampled_neg, strict=True)
        )
        loss_cls, loss_reg = rpn_losses(
            objectness.flatten(),
            deltas,
            t.labels.reshape(-1),
            t.reg_targets.reshape(-1, 4),
            t.sampled_pos.reshape(-1),
            t.sampled_neg.reshape(-1),
            avg_factor=avg_factor,
        )
        return {"loss_rpn_cls": self.cls_weight * loss_cls, "loss_rpn_bbox": self.reg_weight * loss_reg}


@dataclass(frozen=True, kw_only=True)
class RoICriterion:
    """The fc baseline's and the Double-Head's R-CNN losses: ``loss_cls`` = ``cls_weight`` · CE of
    ``cls_logits`` (the fc branch), ``loss_bbox`` = ``reg_weight`` · Smooth-L1(``beta``) of the true class's
    ``box_deltas`` (the conv branch for Double-Head). ``beta = 0`` is L1.

    Defaults are mmdet's Double-Head (2, 2, 1); its FPN baseline uses 1, 1, 0.
    """

    cls_weight: float = 2.0
    reg_weight: float = 2.0
    beta: float = 1.0

    def __call__(self, out: RoIOutputs) -> dict[str, Tensor]:
        t = _roi_targets(out)
        return double_head_losses(
            out.head, t.labels, t.reg_targets, cls_weight=self.cls_weight, reg_weight=self.reg_weight, beta=self.beta
        )


@dataclass(frozen=True, kw_only=True)
class DoubleHeadExtCriterion:
    """Double-Head-Ext: both branches classify and regress; ``ω_fc·[λ_fc·L_cls^fc + (1−λ_fc)·L_reg^fc] +
    ω_conv·[(1−λ_conv)·L_cls^conv + λ_conv·L_reg^conv]`` as ``loss_cls_fc``, ``loss_bbox_fc``,
    ``loss_cls_conv``, ``loss_bbox_conv``. Defaults (the paper's) give 1.4 / 0.6 / 0.5 / 2.0."""

    omega_fc: float = 2.0
    lambda_fc: float = 0.7
    omega_conv: float = 2.5
    lambda_conv: float = 0.8
    beta: float = 1.0

    def __call__(self, out: RoIOutputs) -> dict[str, Tensor]:
        t = _roi_targets(out)
        return double_head_ext_losses(
            out.head,
            t.labels,
            t.reg_targets,
            omega_fc=self.omega_fc,
            lambda_fc=self.lambda_fc,
            omega_conv=self.omega_conv,
            lambda_conv=self.lambda_conv,
            beta=self.beta,
        )


RoILoss = Callable[[RoIOutputs], dict[str, Tensor]]
"""An RoI criterion: :class:`RoICriterion`, :class:`DoubleHeadExtCriterion`, or any callable of that shape."""


@dataclass(frozen=True, kw_only=True)
class DetectionCriterion:
    """``__call__(outputs: DetectorOutputs) -> dict[str, Tensor]``: the RPN's terms, then the RoI head's.

    Keys: ``loss_rpn_cls``, ``loss_rpn_bbox`` and the RoI criterion's (``loss_cls``, ``loss_bbox``, or the four
    Double-Head-Ext terms). Their sum is the training loss.
    """

    rpn: RPNCriterion
    roi: RoILoss

    def __call__(self, outputs: DetectorOutputs) -> dict[str, Tensor]:
        return {**self.rpn(outputs.rpn), **self.roi(outputs.roi)}

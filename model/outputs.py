"""What the detector's stages return: raw network outputs and the targets sampled for them.

The model fills these; :mod:`model.criterion` turns them into losses; post-processing turns them into
detections. ``B`` images; ``A`` anchors per image over all FPN levels (``Σ_l H_l·W_l·A_l``, in the order of
torchvision's ``concat_box_prediction_layers``: level, then row ``y``, column ``x``, anchor ``a`` — the
order of :meth:`model.anchors.MMDetAnchorGenerator.grid_anchors`); ``N`` RoIs over the batch; ``K``
foreground classes. Boxes are xyxy in input pixels. Labels: ``0`` = background, ``1..K`` the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


class BoxHeadOutput(NamedTuple):
    """Raw outputs of a box head for ``N`` RoIs and ``K`` classes.

    ``cls_logits``: ``[N, K+1]`` logits, column 0 = background (the fc branch for Double-Head).
    ``box_deltas``: ``[N, 4·K]`` class-specific deltas (the conv branch for Double-Head).
    ``cls_logits_conv``: ``[N, K+1]`` conv-branch logits (Double-Head-Ext only).
    ``box_deltas_fc``: ``[N, 4·K]`` fc-branch deltas (Double-Head-Ext only).
    """

    cls_logits: Tensor
    box_deltas: Tensor
    cls_logits_conv: Tensor | None = None
    box_deltas_fc: Tensor | None = None


@dataclass
class RPNTargets:
    """The RPN's assignment and sampling over the ``A`` anchors of each image (mmdet ``MaxIoUAssigner`` +
    the injected sampler).

    ``labels``: ``[B, A]`` float32, 1 positive / 0 negative / -1 ignored (outside the image's padded extent,
    or between the IoU thresholds).
    ``reg_targets``: ``[B, A, 4]`` deltas (stds 1) of each anchor's matched gt box (meaningful for positives).
    ``sampled_pos``, ``sampled_neg``: ``[B, A]`` bool, the anchors the sampler chose.
    """

    labels: Tensor
    reg_targets: Tensor
    sampled_pos: Tensor
    sampled_neg: Tensor


@dataclass
class RPNOutputs:
    """One RPN pass: the head's maps per FPN level, the anchors, the proposals and (given gt) the targets.

    ``objectness``: per level ``[B, A_l, H_l, W_l]`` logits (``A_l`` anchors per location).
    ``deltas``: per level ``[B, 4·A_l, H_l, W_l]`` deltas (stds 1).
    ``anchors``: ``[A, 4]`` float32, shared by the images of the batch.
    ``proposals``: per image ``[P_i, 4]``, clipped to the unpadded image, sorted by score (the train- or
    test-mode pre/post-NMS counts of the module's mode).
    ``targets``: :class:`RPNTargets`, or ``None`` when the pass had no ground truth.
    """

    objectness: list[Tensor]
    deltas: list[Tensor]
    anchors: Tensor
    proposals: list[Tensor]
    targets: RPNTargets | None = None


@dataclass
class RoITargets:
    """Labels and regression targets of the ``N`` sampled RoIs (rows of :attr:`RoIOutputs.rois`, concatenated).

    ``labels``: ``[N]`` int64, 0 = background, 1..K.
    ``reg_targets``: ``[N, 4]`` deltas of the matched gt box, normalised by the RoI head's ``bbox_reg_stds``.
    """

    labels: Tensor
    reg_targets: Tensor


@dataclass
class RoIOutputs:
    """One pass of the box head over per-image RoIs.

    ``head``: :class:`BoxHeadOutput` for the ``N = Σ_i S_i`` RoIs, in the order of ``rois``.
    ``rois``: per image ``[S_i, 4]``: the sampled RoIs (rows of ``cat(proposals_i, gt_i)``, positives first)
    when the pass had ground truth, else the proposals.
    ``targets``: :class:`RoITargets`, or ``None`` when the pass had no ground truth.
    """

    head: BoxHeadOutput
    rois: list[Tensor]
    targets: RoITargets | None = None


@dataclass
class DetectorOutputs:
    """What :class:`model.criterion.DetectionCriterion` scores: the RPN's and the RoI head's outputs of one pass,
    with their sampled targets."""

    rpn: RPNOutputs
    roi: RoIOutputs

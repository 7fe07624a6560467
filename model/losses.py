"""Detection losses and the sampling of the examples they see, callable on their own (validation loss,
re-weighting, tests).

Conventions: RoI labels are ``0`` for background and ``1..K`` for the classes; box deltas are
class-specific ``[N, 4·K]`` with class ``k`` in columns ``4(k−1) .. 4(k−1)+3`` (no background slot, as
mmdet). Every R-CNN term is normalised by the number of sampled RoIs plus float32 eps, as mmdet 3.x.
Losses are computed in float32, or in float64 for a float64 model (half-precision inputs are upcast).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from model.outputs import BoxHeadOutput

EPS = float(torch.finfo(torch.float32).eps)


class Sampler(Protocol):
    """Chooses the examples (anchors or RoIs) that the losses see, per image.

    ``__call__(labels)`` takes per image ``labels [N_i]`` (``≥ 1`` positive, ``0`` negative, ``-1`` ignored) and
    returns ``(pos, neg)``: per image int64 indices into ``labels``, positives ``[P_i]`` and negatives ``[Q_i]``.
    The RoI head feeds its sampled RoIs to the head in the order given, positives first (as mmdet).
    """

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]: ...


class RandomSampler:
    """mmdet's ``RandomSampler`` (``neg_pos_ub=-1``): per image at most ``num·pos_fraction`` positives, drawn
    uniformly without replacement, and negatives up to ``num`` in all; torch's global generator.

    Draws exactly as torchvision's ``BalancedPositiveNegativeSampler`` (same random stream), and returns
    each set's indices in ascending order.
    """

    def __init__(self, num: int, pos_fraction: float) -> None:
        self.num = num
        self.pos_fraction = pos_fraction
        self._balanced = BalancedPositiveNegativeSampler(num, pos_fraction)

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = self._balanced(labels)
        return [torch.where(m)[0] for m in pos_masks], [torch.where(m)[0] for m in neg_masks]


def _loss_dtype(x: Tensor) -> Tensor:
    """``x`` upcast to float32 if it is half precision (autocast), else unchanged (float32 or float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rpn_losses(
    objectness: Tensor,
    deltas: Tensor,
    labels: Tensor,
    reg_targets: Tensor,
    sampled_pos: Tensor,
    sampled_neg: Tensor,
    avg_factor: float,
) -> tuple[Tensor, Tensor]:
    """mmdet RPN losses: sigmoid CE over sampled anchors and L1 over positive deltas.

    Args:
        objectness: ``[A]`` logits of all anchors of the batch.
        deltas: ``[A, 4]`` predicted deltas; reg_targets ``[A, 4]`` encoded targets (stds 1).
        labels: ``[A]`` float, 1 positive / 0 negative / -1 ignored.
        sampled_pos, sampled_neg: ``[A]`` bool (or 0/1) masks from the sampler.
        avg_factor: Σ over images of max(#pos, 1) + max(#neg, 1).
    Returns:
        ``(loss_cls, loss_bbox)`` 0-d tensors.
    """
    pos = torch.where(sampled_pos.bool())[0]
    sampled = torch.where(sampled_pos.bool() | sampled_neg.bool())[0]
    logits = _loss_dtype(objectness[sampled])
    loss_cls = F.binary_cross_entropy_with_logits(logits, labels[sampled].to(logits.dtype), reduction="sum")
    picked = _loss_dtype(deltas[pos])
    loss_reg = F.l1_loss(picked, reg_targets[pos].to(picked.dtype), reduction="sum")
    return loss_cls / avg_factor, loss_reg / avg_factor


def cls_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax CE summed over the ``N`` RoIs, divided by ``N + eps``. logits ``[N, K+1]``, labels ``[N]``."""
    return F.cross_entropy(_loss_dtype(logits), labels, reduction="sum") / (labels.numel() + EPS)


def reg_loss(deltas: Tensor, labels: Tensor, targets: Tensor, beta: float = 1.0) -> Tensor:
    """Smooth-L1 (β; β = 0 is L1) on the true-class deltas of positives, divided by ``N + eps``.

    deltas ``[N, 4·K]``, labels ``[N]`` (0 = background), targets ``[N, 4]`` encoded with the RoI stds.
    """
    pos = torch.where(labels > 0)[0]
    picked = _loss_dtype(deltas).view(deltas.shape[0], -1, 4)[pos, labels[pos] - 1]
    loss = F.smooth_l1_loss(picked, targets[pos].to(picked.dtype), beta=beta, reduction="sum")
    return loss / (labels.numel() + EPS)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of RoIs (background included) whose argmax is the label, in [0, 1]."""
    if labels.numel() == 0:
        return logits.new_zeros(())
    return (logits.argmax(dim=1) == labels).float().mean()


def double_head_losses(
    out: BoxHeadOutput,
    labels: Tensor,
    targets: Tensor,
    *,
    cls_weight: float = 2.0,
    reg_weight: float = 2.0,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """Double-Head (and the fc baseline): ``cls_weight·CE(fc) + reg_weight·SmoothL1(conv)``."""
    return {
        "loss_cls": cls_weight * cls_loss(out.cls_logits, labels),
        "loss_bbox": reg_weight * reg_loss(out.box_deltas, labels, targets, beta),
    }


def double_head_ext_losses(
    out: BoxHeadOutput,
    labels: Tensor,
    targets: Tensor,
    *,
    omega_fc: float = 2.0,
    lambda_fc: float = 0.7,
    omega_conv: float = 2.5,
    lambda_conv: float = 0.8,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """Double-Head-Ext: ω_fc·[λ_fc·L_cls^fc + (1−λ_fc)·L_reg^fc] + ω_conv·[(1−λ_conv)·L_cls^conv +
    λ_conv·L_reg^conv]. Defaults give 1.4·cls_fc + 0.6·reg_fc + 0.5·cls_conv + 2.0·reg_conv."""
    if out.cls_logits_conv is None or out.box_deltas_fc is None:
        raise ValueError("Double-Head-Ext losses need cls_logits_conv and box_deltas_fc")
    return {
        "loss_cls_fc": omega_fc * lambda_fc * cls_loss(out.cls_logits, labels),
        "loss_bbox_fc": omega_fc * (1 - lambda_fc) * reg_loss(out.box_deltas_fc, labels, targets, beta),
        "loss_cls_conv": omega_conv * (1 - lambda_conv) * cls_loss(out.cls_logits_conv, labels),
        "loss_bbox_conv": omega_conv * lambda_conv * reg_loss(out.box_deltas, labels, targets, beta),
    }

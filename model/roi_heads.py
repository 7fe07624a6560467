"""Second stage: sampling, pooling both branches, losses and post-processing.

Reuses torchvision's ``RoIHeads`` for proposal/gt matching (IoU 0.5, no low-quality matches) and GT boxes
added as proposals (appended after each image's proposals; mmdet prepends them). The RoIs the losses see are
chosen by an injected :class:`~model.losses.Sampler` (by default mmdet's ``RandomSampler``: 512 RoIs, 25 %
positive) and are fed to the head positives first, as mmdet. Replaces its forward because the
Double-Head pools two feature sets and its losses and outputs follow mmdet (spec §3.2, §6.3): CE and
Smooth-L1(β=1) each ×2 normalised by the sampled RoIs, ``[N, 4K]`` deltas without a background slot,
no small-box filter at test time.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from model.box_coder import DeltaXYWHBoxCoder
from model.losses import BoxHeadOutput, RandomSampler, Sampler, double_head_ext_losses, double_head_losses
from model.roi_pooler import LevelRoIPooler


def fuse_ext_scores(cls_logits_fc: Tensor, cls_logits_conv: Tensor) -> Tensor:
    """Double-Head-Ext complementary fusion on softmax probabilities: ``s_fc + s_conv·(1 − s_fc)``.

    ``[N, K+1]`` logits each -> ``[N, K+1]`` fused scores (column 0 is background and is not used).
    """
    s_fc = torch.softmax(cls_logits_fc.float(), dim=1)
    s_conv = torch.softmax(cls_logits_conv.float(), dim=1)
    return s_fc + s_conv * (1 - s_fc)


class DoubleHeadRoIHeads(RoIHeads):
    """``forward(features, proposals, image_sizes, targets) -> (detections, losses)``.

    Detections per image: ``boxes [D, 4]`` float32 xyxy (input pixels), ``scores [D]``, ``labels [D]``
    int64 in 1..K, sorted by score, ``D ≤ detections_per_img``.
    """

    def __init__(
        self,
        box_roi_pool: LevelRoIPooler,
        box_head: nn.Module,
        *,
        head_kind: Literal["double", "double_ext", "fc"] = "double",
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        cls_loss_weight: float = 2.0,
        reg_loss_weight: float = 2.0,
        smooth_l1_beta: float = 1.0,
        ext_weights: tuple[float, float, float, float] = (2.0, 0.7, 2.5, 0.8),
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__(
            box_roi_pool,
            box_head,
            None,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            None,
            score_thresh,
            nms_thresh,
            detections_per_img,
        )
        self.box_coder = DeltaXYWHBoxCoder(bbox_reg_stds)
        self.head_kind = head_kind
        self.cls_loss_weight = cls_loss_weight
        self.reg_loss_weight = reg_loss_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.ext_weights = ext_weights
        # chooses the RoIs of the losses (labels per image over its proposals followed by its gt boxes)
        self.sampler: Sampler = (
            sampler if sampler is not None else RandomSampler(batch_size_per_image, positive_fraction)
        )
        del self.fg_bg_sampler  # torchvision's, replaced by ``sampler``

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            proposals, _, labels, reg_targets = self.select_training_samples(proposals, targets)
        out = self.box_head(*self.box_roi_pool(features, proposals))
        if self.training:
            return [], self.losses(out, torch.cat(labels), torch.cat(reg_targets))
        return self.postprocess(out, proposals, image_shapes), {}

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Add the gt boxes as proposals, match, sample, and encode the regression targets.

        Args:
            proposals: per image ``[P_i, 4]`` xyxy.
            targets: per image ``boxes [G_i, 4]``, ``labels [G_i]`` in 1..K.
        Returns:
            per image, for the ``S_i`` sampled RoIs (positives first, in the sampler's order): the RoIs
            ``[S_i, 4]`` (rows of ``cat(proposals_i, gt_i)``), matched gt index ``[S_i]``, labels ``[S_i]``
            (0 = background) and regression targets ``[S_i, 4]`` (RoI stds).
        """
        if targets is None:
            raise ValueError("targets are required in training mode")
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        pos, neg = self.sampler(labels)
        rois, matched, sampled_labels, matched_boxes = [], [], [], []
        for props, idx, lab, gt, p, n in zip(proposals, matched_idxs, labels, gt_boxes, pos, neg, strict=True):
            keep = torch.cat([p, n])
            rois.append(props[keep])
            matched.append(idx[keep])
            sampled_labels.append(lab[keep])
            if gt.numel() == 0:
                gt = gt.new_zeros((1, 4))
            matched_boxes.append(gt[idx[keep]])
        return rois, matched, sampled_labels, self.box_coder.encode(matched_boxes, rois)

    def losses(self, out: BoxHeadOutput, labels: Tensor, reg_targets: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms for sampled RoIs: labels ``[N]`` (0 = bg), reg_targets ``[N, 4]``."""
        if self.head_kind == "double_ext":
            omega_fc, lambda_fc, omega_conv, lambda_conv = self.ext_weights
            return double_head_ext_losses(
                out,
                labels,
                reg_targets,
                omega_fc=omega_fc,
                lambda_fc=lambda_fc,
                omega_conv=omega_conv,
                lambda_conv=lambda_conv,
                beta=self.smooth_l1_beta,
            )
        return double_head_losses(
            out,
            labels,
            reg_targets,
            cls_weight=self.cls_loss_weight,
            reg_weight=self.reg_loss_weight,
            beta=self.smooth_l1_beta,
        )

    def class_scores(self, out: BoxHeadOutput) -> Tensor:
        """``[N, K+1]`` probabilities (fused for Double-Head-Ext)."""
        if self.head_kind == "double_ext" and out.cls_logits_conv is not None:
            return fuse_ext_scores(out.cls_logits, out.cls_logits_conv)
        return torch.softmax(out.cls_logits.float(), dim=1)

    def decode_boxes(self, out: BoxHeadOutput, proposals: list[Tensor], image_shapes) -> list[Tensor]:
        """Per image ``[N_i, K, 4]`` class-specific boxes, clipped to the unpadded image."""
        num_classes = out.box_deltas.shape[1] // 4
        boxes = self.box_coder.decode_single(out.box_deltas, torch.cat(proposals).float())
        boxes = boxes.view(-1, num_classes, 4)
        per_image = boxes.split([p.shape[0] for p in proposals])
        return [box_ops.clip_boxes_to_image(b, size) for b, size in zip(per_image, image_shapes, strict=True)]

    def postprocess(
        self, out: BoxHeadOutput, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Score threshold (strict), class-wise NMS, top ``detections_per_img``; no small-box filter."""
        scores = self.class_scores(out)[:, 1:].split([p.shape[0] for p in proposals])
        results = []
        for boxes, s in zip(self.decode_boxes(out, proposals, image_shapes), scores, strict=True):
            num_classes = s.shape[1]
            labels = torch.arange(1, num_classes + 1, device=s.device).expand_as(s)
            boxes, s, labels = boxes.reshape(-1, 4), s.reshape(-1), labels.reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            boxes, s, labels = boxes[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, s, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": s[keep], "labels": labels[keep]})
        return results

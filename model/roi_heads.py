"""Second stage: sampling, pooling both branches, the box head's raw outputs, and post-processing.

Reuses torchvision's ``RoIHeads`` for proposal/gt matching (IoU 0.5, no low-quality matches) and GT boxes
added as proposals (appended after each image's proposals; mmdet prepends them). The RoIs the losses see are
chosen by an injected :class:`~model.losses.Sampler` (by default mmdet's ``RandomSampler``: 512 RoIs, 25 %
positive) and are fed to the head positives first, as mmdet. Replaces its forward because the
Double-Head pools two feature sets and its outputs follow mmdet (spec §3.2, §6.3): ``[N, 4K]`` deltas
without a background slot, no small-box filter at test time. The losses are computed apart, by a
:mod:`model.criterion` RoI criterion, from the :class:`~model.outputs.RoIOutputs` returned here.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from model.box_coder import DeltaXYWHBoxCoder
from model.losses import RandomSampler, Sampler
from model.outputs import BoxHeadOutput, RoIOutputs, RoITargets
from model.roi_pooler import LevelRoIPooler


class BoxHead(Protocol):
    """What the RoI heads need of a box head (:mod:`model.box_head`).

    ``__call__(*pooled)``: the pooler's ``[N, C, S, S]`` features, one per RoI scale factor -> ``BoxHeadOutput``.
    ``class_scores(out)``: ``[N, K+1]`` float32 test-time probabilities (column 0 = background).
    """

    def __call__(self, *pooled: Tensor) -> BoxHeadOutput: ...

    def class_scores(self, out: BoxHeadOutput) -> Tensor: ...


class DoubleHeadRoIHeads(RoIHeads):
    """``forward(features, proposals, image_sizes, targets=None) -> RoIOutputs``; ``postprocess`` -> detections.

    With ``targets`` (required in training mode) the head runs on RoIs sampled from ``cat(proposals, gt)``
    and the outputs carry their :class:`~model.outputs.RoITargets`; without, it runs on every proposal.
    Detections per image (:meth:`postprocess`): ``boxes [D, 4]`` float32 xyxy (input pixels), ``scores [D]``,
    ``labels [D]`` int64 in 1..K, sorted by score, ``D ≤ detections_per_img``; the scores are the box head's
    :meth:`BoxHead.class_scores`.
    """

    def __init__(
        self,
        box_roi_pool: LevelRoIPooler,
        box_head: nn.Module,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
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
    ) -> RoIOutputs:
        """Args: FPN ``features``, per image ``proposals [P_i, 4]`` and unpadded ``(H, W)``, and optionally
        per image ``boxes [G_i, 4]`` / ``labels [G_i]`` (1..K) targets."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        if targets is None:
            return RoIOutputs(head=self.box_head(*self.box_roi_pool(features, proposals)), rois=proposals)
        rois, _, labels, reg_targets = self.select_training_samples(proposals, targets)
        return RoIOutputs(
            head=self.box_head(*self.box_roi_pool(features, rois)),
            rois=rois,
            targets=RoITargets(labels=torch.cat(labels), reg_targets=torch.cat(reg_targets)),
        )

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
        """Detections from the head's outputs ``out`` for per-image ``proposals [P_i, 4]`` (the RoIs it ran on).

        The box head's class scores, score threshold (strict), class-wise NMS, top ``detections_per_img``; no
        small-box filter. Returns per image ``boxes [D, 4]`` float32 xyxy, ``scores [D]``, ``labels [D]`` in 1..K.
        """
        scores = self.box_head.class_scores(out)[:, 1:].split([p.shape[0] for p in proposals])
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

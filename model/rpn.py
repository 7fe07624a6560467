"""Region proposal network with mmdet's anchor assignment and sampling; it returns raw outputs, and
:class:`model.criterion.RPNCriterion` scores them.

Reuses torchvision's ``RPNHead``, ``RegionProposalNetwork`` top-k / NMS filtering and ``Matcher`` thresholds;
the anchors the losses see are chosen by an injected :class:`~model.losses.Sampler` (by default mmdet's
``RandomSampler``, which draws as torchvision's ``BalancedPositiveNegativeSampler``). Differs from
torchvision where mmdet does (spec §3.1, §6.3): low-quality matches need IoU ≥ ``min_pos_iou`` and go to
the gt they are best for; anchors outside an image's own padded extent are ignored; only the top-k anchors
of each level are decoded; boxes with zero width or height are dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from model.anchors import MMDetAnchorGenerator
from model.box_coder import DeltaXYWHBoxCoder
from model.losses import RandomSampler, Sampler
from model.outputs import RPNOutputs, RPNTargets


class MMDetRPN(RegionProposalNetwork):
    """``forward(images, features, targets=None) -> RPNOutputs``: raw maps, anchors, proposals and, given
    ``targets``, the anchors' assigned and sampled targets (:class:`~model.outputs.RPNTargets`).

    Proposals are xyxy in input pixels, clipped to each image's unpadded size, sorted by score; their
    pre/post-NMS counts follow the module's mode (``training`` / ``testing``). Targets are required in
    training mode; in eval mode they are assigned on the same pass's anchors when given (validation loss).
    """

    def __init__(
        self,
        anchor_generator: MMDetAnchorGenerator,
        head: torch.nn.Module,
        *,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        min_pos_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        size_divisible: int = 32,
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            pre_nms_top_n or {"training": 2000, "testing": 1000},
            post_nms_top_n or {"training": 1000, "testing": 1000},
            nms_thresh,
            score_thresh=0.0,
        )
        self.box_coder = DeltaXYWHBoxCoder()
        self.min_pos_iou = min_pos_iou
        self.min_size = float(torch.finfo(torch.float32).tiny)  # mmdet keeps w > 0 and h > 0
        self.size_divisible = size_divisible
        # chooses the anchors of the losses (labels per image over all anchors of the batch's grid)
        self.sampler: Sampler = (
            sampler if sampler is not None else RandomSampler(batch_size_per_image, positive_fraction)
        )
        del self.fg_bg_sampler  # torchvision's, replaced by ``sampler``

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> RPNOutputs:
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        proposals, _ = self.predict_proposals(objectness, deltas, anchors[0], images.image_sizes)
        out = RPNOutputs(objectness=objectness, deltas=deltas, anchors=anchors[0], proposals=proposals)
        if targets is not None:
            feature_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
            labels, matched_gt = self.assign_targets(anchors[0], feature_sizes, images.image_sizes, targets)
            reg_targets = self.box_coder.encode(matched_gt, anchors)
            pos, neg = self.sample(labels)
            out.targets = RPNTargets(
                labels=torch.stack(labels),
                reg_targets=torch.stack(reg_targets),
                sampled_pos=torch.stack(pos),
                sampled_neg=torch.stack(neg),
            )
        return out

    def sample(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The sampler's choice as per-image ``[A]`` bool masks (positives, negatives) over ``labels [A]``."""
        pos_inds, neg_inds = self.sampler(labels)
        pos, neg = [], []
        for lab, p, n in zip(labels, pos_inds, neg_inds, strict=True):
            pos.append(torch.zeros_like(lab, dtype=torch.bool).index_fill_(0, p, True))
            neg.append(torch.zeros_like(lab, dtype=torch.bool).index_fill_(0, n, True))
        return pos, neg

    def predict_proposals(
        self,
        objectness: list[Tensor],
        deltas: list[Tensor],
        anchors: Tensor,
        image_sizes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Top-k per level, decode, clip, drop empty boxes, NMS per level, keep the best.

        Args:
            objectness: per level ``[B, A, H_l, W_l]`` logits.
            deltas: per level ``[B, 4·A, H_l, W_l]`` deltas (stds 1).
            anchors: ``[sum_l H_l·W_l·A, 4]`` anchors shared by the batch.
            image_sizes: ``(H, W)`` of each unpadded image.
        Returns:
            proposals ``[P_i, 4]`` and their sigmoid scores ``[P_i]`` per image, sorted by score.
        """
        num_images = objectness[0].shape[0]
        num_per_level = [o[0].numel() for o in objectness]
        flat_obj, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        flat_obj = flat_obj.detach().float().view(num_images, -1)
        flat_deltas = flat_deltas.detach().view(num_images, -1, 4)
        top_idx = self._get_top_n_idx(flat_obj, num_per_level)  # [B, sum_l k_l]
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=anchors.device) for i, n in enumerate(num_per_level)]
        )[top_idx]
        batch = torch.arange(num_images, device=anchors.device)[:, None]
        scores = torch.sigmoid(flat_obj[batch, top_idx])
        boxes = self.box_coder.decode_single(
            flat_deltas[batch, top_idx].reshape(-1, 4), anchors[top_idx].reshape(-1, 4)
        ).view(num_images, -1, 4)
        out_boxes, out_scores = [], []
        for b, s, lvl, size in zip(boxes, scores, levels, image_sizes, strict=True):
            b = box_ops.clip_boxes_to_image(b, size)
            keep = box_ops.remove_small_boxes(b, self.min_size)
            b, s, lvl = b[keep], s[keep], lvl[keep]
            keep = box_ops.batched_nms(b, s, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
        return out_boxes, out_scores

    def assign_targets(
        self,
        anchors: Tensor,
        feature_sizes: list[tuple[int, int]],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """mmdet ``MaxIoUAssigner`` (pos 0.7, neg 0.3, low-quality ≥ min_pos_iou, gt_max_assign_all).

        Returns per image ``labels [A]`` float (1 positive, 0 negative, -1 ignored) and the matched gt
        box ``[A, 4]`` of every anchor (only meaningful for positives).
        """
        labels, matched = [], []
        for size, target in zip(image_sizes, targets, strict=True):
            pad = tuple(-(-s // self.size_divisible) * self.size_divisible for s in size)
            valid = self.anchor_generator.valid_flags(feature_sizes, pad, anchors.device)
            gt = target["boxes"].to(anchors.dtype)
            lab = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
            if gt.numel() == 0:
                lab[~valid] = -1.0
                labels.append(lab)
                matched.append(torch.zeros_like(anchors))
                continue
            iou = box_ops.box_iou(gt, anchors)  # [G, A]
            iou[:, ~valid] = -1.0
            max_iou, argmax = iou.max(dim=0)
            assigned = torch.full_like(argmax, -1)  # -1 ignore, 0 negative, i + 1 -> gt i
            assigned[(max_iou >= 0) & (max_iou < self.proposal_matcher.low_threshold)] = 0
            pos = max_iou >= self.proposal_matcher.high_threshold
            assigned[pos] = argmax[pos] + 1
            gt_max = iou.max(dim=1).values  # [G]
            low_quality = (iou == gt_max[:, None]) & (gt_max[:, None] >= self.min_pos_iou)
            gt_index = torch.arange(1, gt.shape[0] + 1, device=gt.device)[:, None]
            last_gt = (low_quality * gt_index).max(dim=0).values  # later gts overwrite earlier ones
            assigned = torch.where(last_gt > 0, last_gt, assigned)
            assigned[~valid] = -1
            lab = (assigned > 0).float()
            lab[assigned < 0] = -1.0
            labels.append(lab)
            matched.append(gt[(assigned - 1).clamp(min=0)])
        return labels, matched

"""A :class:`~model.config.ModelConfig` into modules: :func:`build_model` (the detector) and
:func:`build_criterion` (its losses). The head kind's parts come from one table, :data:`ROI_HEAD_KINDS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models.detection.rpn import RPNHead

from model.anchors import MMDetAnchorGenerator
from model.backbone import build_backbone
from model.box_head import DoubleHeadBoxHead, TwoFCBoxHead
from model.config import ModelConfig, model_config
from model.criterion import DetectionCriterion, DoubleHeadExtCriterion, RoICriterion, RoILoss, RPNCriterion
from model.detector import DoubleHeadRCNN
from model.losses import RandomSampler, Sampler
from model.roi_heads import DoubleHeadRoIHeads
from model.roi_pooler import LevelRoIPooler
from model.rpn import MMDetRPN
from model.transform import NormalizePad

HeadBuilder = Callable[[ModelConfig], tuple[nn.Module, tuple[float, ...]]]
"""``cfg -> (box head, RoI scale factor of each of its pooled inputs)``."""
CriterionBuilder = Callable[[ModelConfig], RoILoss]


def _fc_head(cfg: ModelConfig) -> tuple[nn.Module, tuple[float, ...]]:
    """The FPN baseline's two-fc head on one RoI scale."""
    h = cfg.roi_head
    return TwoFCBoxHead(cfg.fpn.out_channels, cfg.num_classes, h.roi_size, h.fc_channels), (1.0,)


def _double_head(cfg: ModelConfig, *, ext: bool = False) -> tuple[nn.Module, tuple[float, ...]]:
    """The Double-Head (``ext``: Double-Head-Ext): fc branch on the RoI, conv branch on it enlarged."""
    h = cfg.roi_head
    head = DoubleHeadBoxHead(
        cfg.fpn.out_channels,
        cfg.num_classes,
        roi_size=h.roi_size,
        conv_channels=h.conv_channels,
        num_conv_blocks=h.num_conv_blocks,
        fc_channels=h.fc_channels,
        ext=ext,
    )
    return head, (1.0, h.reg_roi_scale_factor)


def _double_ext_head(cfg: ModelConfig) -> tuple[nn.Module, tuple[float, ...]]:
    return _double_head(cfg, ext=True)


def _roi_criterion(cfg: ModelConfig) -> RoICriterion:
    h = cfg.roi_head
    return RoICriterion(cls_weight=h.cls_loss_weight, reg_weight=h.reg_loss_weight, beta=h.smooth_l1_beta)


def _ext_criterion(cfg: ModelConfig) -> DoubleHeadExtCriterion:
    h = cfg.roi_head
    return DoubleHeadExtCriterion(
        omega_fc=h.ext_omega_fc,
        lambda_fc=h.ext_lambda_fc,
        omega_conv=h.ext_omega_conv,
        lambda_conv=h.ext_lambda_conv,
        beta=h.smooth_l1_beta,
    )


# ``roi_head.head`` -> (box head builder, RoI criterion builder); the only place head kinds are told apart
ROI_HEAD_KINDS: dict[str, tuple[HeadBuilder, CriterionBuilder]] = {
    "fc": (_fc_head, _roi_criterion),
    "double": (_double_head, _roi_criterion),
    "double_ext": (_double_ext_head, _ext_criterion),
}


def build_model(
    cfg: ModelConfig, *, rpn_sampler: Sampler | None = None, roi_sampler: Sampler | None = None
) -> DoubleHeadRCNN:
    """Build the detector described by ``cfg`` (random init except ``backbone.weights``).

    ``rpn_sampler`` / ``roi_sampler`` replace the random samplers of the config (``rpn`` / ``roi_head``
    ``batch_size_per_image`` and ``positive_fraction``) that choose the anchors and RoIs of the losses,
    e.g. to replay recorded choices in a test.
    """
    backbone = build_backbone(
        depth=cfg.backbone.depth,
        norm=cfg.backbone.norm,
        frozen_stages=cfg.backbone.frozen_stages,
        fpn_channels=cfg.fpn.out_channels,
        weights=cfg.backbone.weights,
    )
    r = cfg.rpn
    anchors = MMDetAnchorGenerator(r.anchor_strides, r.anchor_scales, r.anchor_ratios)
    rpn_head = RPNHead(cfg.fpn.out_channels, anchors.num_anchors_per_location()[0])
    rpn = MMDetRPN(
        anchors,
        rpn_head,
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        min_pos_iou=r.min_pos_iou,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
        size_divisible=cfg.size_divisible,
        sampler=rpn_sampler if rpn_sampler is not None else RandomSampler(r.batch_size_per_image, r.positive_fraction),
    )
    h = cfg.roi_head
    build_head, _ = ROI_HEAD_KINDS[h.head]
    box_head, scales = build_head(cfg)
    pooler = LevelRoIPooler(
        featmap_names=("0", "1", "2", "3"),
        strides=tuple(r.anchor_strides[:4]),
        output_size=h.roi_size,
        finest_scale=h.finest_scale,
        scale_factors=scales,
        sampling_ratio=h.sampling_ratio,
    )
    roi_heads = DoubleHeadRoIHeads(
        pooler,
        box_head,
        fg_iou_thresh=h.fg_iou_thresh,
        bg_iou_thresh=h.bg_iou_thresh,
        batch_size_per_image=h.batch_size_per_image,
        positive_fraction=h.positive_fraction,
        bbox_reg_stds=h.bbox_reg_stds,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        sampler=roi_sampler if roi_sampler is not None else RandomSampler(h.batch_size_per_image, h.positive_fraction),
    )
    transform = NormalizePad(cfg.image_mean, cfg.image_std, cfg.size_divisible)
    return DoubleHeadRCNN(backbone, rpn, roi_heads, transform, cfg.num_classes, cfg.channels_last)


def build_criterion(cfg: ModelConfig) -> DetectionCriterion:
    """The losses of the detector :func:`build_model` builds from ``cfg``: ``rpn`` and ``roi_head`` loss weights,
    the RoI criterion of ``roi_head.head``."""
    _, build_roi_criterion = ROI_HEAD_KINDS[cfg.roi_head.head]
    rpn = RPNCriterion(cls_weight=cfg.rpn.cls_loss_weight, reg_weight=cfg.rpn.reg_loss_weight)
    return DetectionCriterion(rpn=rpn, roi=build_roi_criterion(cfg))


def build_detector(preset: str, num_classes: int, **overrides: Any) -> DoubleHeadRCNN:
    """``build_detector("dh_r50_fpn", 80, roi_head={"head": "double_ext"})``: preset + overrides -> model."""
    return build_model(model_config(preset, num_classes, **overrides))

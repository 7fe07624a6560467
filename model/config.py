"""Typed, frozen configuration of the detector, its presets, and YAML loading.

``model_config(preset, num_classes, **overrides)`` resolves a preset; :func:`model.build.build_model`
turns the result into modules. Overrides are nested mappings per section, e.g.
``model_config("dh_r50_fpn", 80, roi_head={"head": "double_ext"}, backbone={"weights": "r50.pth"})``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.typed_config import ConfigError, from_mapping, load_yaml, merge, to_dict

HeadKind = Literal["double", "double_ext", "fc"]
NormKind = Literal["bn_eval", "frozen_bn", "bn", "gn"]


@dataclass(frozen=True)
class BackboneConfig:
    """torchvision ResNet body.

    ``norm``: ``bn_eval`` is mmdet's ``norm_eval=True`` (BatchNorm statistics frozen, affine trained where
    the stage is trainable); ``frozen_bn`` is torchvision's ``FrozenBatchNorm2d`` (nothing trained);
    ``bn`` trains statistics too; ``gn`` is GroupNorm(32) (from scratch, small batches).
    ``frozen_stages``: -1 none, 0 stem, 1 stem + layer1 (mmdet default), ...
    ``weights``: a local torchvision ImageNet checkpoint (e.g. ``resnet50-0676ba61.pth``); never downloaded.
    """

    depth: Literal[18, 34, 50, 101, 152] = 50
    norm: NormKind = "bn_eval"
    frozen_stages: int = 1
    weights: str | None = None

    def __post_init__(self) -> None:
        if not -1 <= self.frozen_stages <= 4:
            raise ConfigError(f"backbone.frozen_stages: expected -1..4, got {self.frozen_stages}")


@dataclass(frozen=True)
class FPNConfig:
    """FPN on C2..C5 with P6 = max_pool(P5, 1, 2) (mmdet ``num_outs=5``, no extra convs)."""

    out_channels: int = 256


@dataclass(frozen=True)
class RPNConfig:
    """RPN head, mmdet anchors, mmdet assignment and losses (sigmoid CE + L1)."""

    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    min_pos_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    cls_loss_weight: float = 1.0
    reg_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.anchor_strides) != 5:
            raise ConfigError("rpn.anchor_strides: expected 5 strides (P2..P6)")
        if not 0.0 <= self.bg_iou_thresh <= self.fg_iou_thresh <= 1.0:
            raise ConfigError("rpn: expected 0 <= bg_iou_thresh <= fg_iou_thresh <= 1")


@dataclass(frozen=True)
class RoIHeadConfig:
    """Second stage. ``head``: ``double`` (mmdet Double-Head), ``double_ext`` (the paper's
    Double-Head-Ext), ``fc`` (the FPN baseline's two-fc head).

    Loss weights: ``double`` uses ``cls_loss_weight``/``reg_loss_weight`` (mmdet: 2.0/2.0); ``double_ext``
    uses ω_fc·[λ_fc·L_cls^fc + (1−λ_fc)·L_reg^fc] + ω_conv·[(1−λ_conv)·L_cls^conv + λ_conv·L_reg^conv]
    (defaults 2.0, 0.7, 2.5, 0.8 give 1.4 / 0.6 / 0.5 / 2.0); ``fc`` uses ``cls_loss_weight``/``reg_loss_weight``.
    ``smooth_l1_beta = 0`` makes the regression loss plain L1.
    """

    head: HeadKind = "double"
    roi_size: int = 7
    sampling_ratio: int = 0  # RoIAlign samples per bin side; 0 = adaptive (mmdet, parity); 2 = torchvision's, faster
    finest_scale: float = 56.0
    reg_roi_scale_factor: float = 1.3
    conv_channels: int = 1024
    num_conv_blocks: int = 4
    fc_channels: int = 1024
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    cls_loss_weight: float = 2.0
    reg_loss_weight: float = 2.0
    smooth_l1_beta: float = 1.0
    ext_omega_fc: float = 2.0
    ext_lambda_fc: float = 0.7
    ext_omega_conv: float = 2.5
    ext_lambda_conv: float = 0.8
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.conv_channels % 4:
            raise ConfigError("roi_head.conv_channels: must be divisible by 4 (Bottleneck expansion)")
        for name in ("ext_lambda_fc", "ext_lambda_conv"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"roi_head.{name}: expected a value in [0, 1]")
        if self.sampling_ratio < 0:
            raise ConfigError("roi_head.sampling_ratio: expected >= 0 (0 = adaptive)")
        if self.reg_roi_scale_factor <= 0:
            raise ConfigError("roi_head.reg_roi_scale_factor: must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """The whole detector. ``num_classes`` counts foreground classes (labels 1..K, 0 = background)."""

    num_classes: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    image_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    image_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisible: int = 32
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes: expected >= 1, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# name -> overrides on top of the dataclass defaults (which are mmdet's dh-faster-rcnn_r50_fpn_1x_coco)
PRESETS: dict[str, dict[str, Any]] = {
    "dh_r50_fpn": {},
    "dh_r101_fpn": {"backbone": {"depth": 101}},
    # The FPN baseline of the paper's comparison (mmdet faster-rcnn_r50_fpn_1x: CE ×1 + L1 ×1, one RoI scale).
    "frcnn_r50_fpn": {
        "roi_head": {"head": "fc", "cls_loss_weight": 1.0, "reg_loss_weight": 1.0, "smooth_l1_beta": 0.0}
    },
    # ResNet-18, 64-channel FPN and narrow heads (the mmdet parity fixture's sizes); trains on a CPU.
    # Fewer proposals and sampled RoIs than mmdet's 2000/1000 and 512 keep a CPU step cheap.
    "tiny": {
        # no ImageNet weights on a CPU demo: train from scratch with batch-statistics BatchNorm
        "backbone": {"depth": 18, "frozen_stages": -1, "norm": "bn"},
        "fpn": {"out_channels": 64},
        "rpn": {"pre_nms_top_n_train": 1000, "post_nms_top_n_train": 500, "pre_nms_top_n_test": 500},
        "roi_head": {"conv_channels": 128, "fc_channels": 256, "batch_size_per_image": 128, "sampling_ratio": 2},
    },
}


def model_config(preset: str, num_classes: int, **overrides: Any) -> ModelConfig:
    """Resolve ``preset`` with ``num_classes`` and nested ``overrides`` into a validated config."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data = merge(PRESETS[preset], {"num_classes": num_classes, **overrides})
    return from_mapping(ModelConfig, data, "model")


def load_model_config(path: str | Path) -> ModelConfig:
    """Load a YAML file holding either a full model config or ``{preset: NAME, num_classes: K, ...}``."""
    data = load_yaml(path)
    preset = data.pop("preset", None)
    if preset is None:
        return from_mapping(ModelConfig, data, "model")
    if "num_classes" not in data:
        raise ConfigError(f"{path}: missing required key num_classes")
    return model_config(preset, **data)

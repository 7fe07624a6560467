"""Import mmdetection Double-Head checkpoints (``dh-faster-rcnn_*``) into this project's layout.

Key mapping (spec §6.2): ``backbone.*`` -> ``backbone.body.*``; ``neck.lateral_convs.i.conv`` ->
``backbone.fpn.inner_blocks.i.0``; ``neck.fpn_convs.i.conv`` -> ``backbone.fpn.layer_blocks.i.0``;
``rpn_head.rpn_conv/rpn_cls/rpn_reg`` -> ``rpn.head.conv.0.0/cls_logits/bbox_pred``;
``roi_head.bbox_head.*`` -> ``roi_heads.box_head.*`` with ``res_block.convX.conv/bn`` -> ``.0/.1`` and
``fc_branch.0/1`` -> ``fc_branch.fc6/fc7``. ``fc_cls`` rows are permuted from mmdet's background-last to
background-first; ``fc_reg`` keeps mmdet's ``[4K, C]`` layout (row ``4c+k`` = our class ``c+1``), which is
also ours. Label ``k`` of this model is mmdet class ``k − 1``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import ModelConfig
from model.typed_config import from_mapping

_RULES: list[tuple[str, str]] = [
    (r"^backbone\.", "backbone.body."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.", "roi_heads.box_head."),
]
_HEAD_RULES: list[tuple[str, str]] = [
    (r"res_block\.(conv1|conv2|conv_identity)\.conv\.", r"res_block.\1.0."),
    (r"res_block\.(conv1|conv2|conv_identity)\.bn\.", r"res_block.\1.1."),
    (r"fc_branch\.0\.", "fc_branch.fc6."),
    (r"fc_branch\.1\.", "fc_branch.fc7."),
]


class MMDetImportError(ValueError):
    """The file is not an mmdet Double-Head checkpoint this importer understands; the message says why."""


def _bg_first(t: Tensor) -> Tensor:
    """Rows ``[c_0 .. c_{K-1}, bg]`` -> ``[bg, c_0 .. c_{K-1}]`` (``fc_cls`` weight or bias)."""
    return torch.cat([t[-1:], t[:-1]], dim=0)


def convert_head_state_dict(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Convert the keys of a ``DoubleConvFCBBoxHead`` state dict (all starting with ``prefix``)."""
    out = {}
    for key, value in state.items():
        rest = key[len(prefix) :]
        for pattern, repl in _HEAD_RULES:
            rest = re.sub("^" + pattern, repl, rest)
        if rest.startswith("fc_cls."):
            value = _bg_first(value)
        out[rest] = value
    return out


def convert_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a whole mmdet Double-Head Faster R-CNN state dict to :class:`model.DoubleHeadRCNN` keys."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head_prefix = "roi_head.bbox_head."
    if not any(k.startswith(head_prefix) for k in state):
        raise MMDetImportError(
            "no 'roi_head.bbox_head.*' keys: not an mmdet two-stage checkpoint (mmdet < 2.0 checkpoints "
            "with 'bbox_head.*' keys must be upgraded with mmdet's tools/model_converters first)"
        )
    out = {}
    head = {k: v for k, v in state.items() if k.startswith(head_prefix)}
    for key, value in convert_head_state_dict(head, head_prefix).items():
        out[f"roi_heads.box_head.{key}"] = value
    for key, value in state.items():
        if key.startswith(head_prefix) or key.startswith("data_preprocessor."):
            continue
        new = key
        for pattern, repl in _RULES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        else:
            raise MMDetImportError(f"unexpected key {key!r}: not part of an mmdet Double-Head Faster R-CNN")
        out[new] = value
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def config_from_mmdet(model_cfg: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Translate an mmdet ``model`` config dict (the ``dh-faster-rcnn`` family) into a :class:`ModelConfig`."""
    try:
        backbone, neck, rpn = model_cfg["backbone"], model_cfg["neck"], model_cfg["rpn_head"]
        roi, head = model_cfg["roi_head"], model_cfg["roi_head"]["bbox_head"]
        test_cfg, train_cfg = model_cfg.get("test_cfg", {}), model_cfg.get("train_cfg", {})
        anchor = rpn["anchor_generator"]
        if head["type"] != "DoubleConvFCBBoxHead" or head.get("reg_class_agnostic", False):
            raise MMDetImportError(f"unsupported bbox head {head['type']} (need class-specific DoubleConvFCBBoxHead)")
        norm = "bn_eval" if backbone.get("norm_eval", True) else "bn"
        data: dict[str, Any] = {
            "num_classes": head["num_classes"],
            "backbone": {
                "depth": backbone["depth"],
                "norm": norm,
                "frozen_stages": backbone.get("frozen_stages", 1),
            },
            "fpn": {"out_channels": neck["out_channels"]},
            "rpn": {
                "anchor_scales": [float(s) for s in anchor["scales"]],
                "anchor_ratios": [float(r) for r in anchor["ratios"]],
                "anchor_strides": list(anchor["strides"]),
            },
            "roi_head": {
                "head": "double",
                "roi_size": head.get("roi_feat_size", 7),
                "sampling_ratio": roi.get("bbox_roi_extractor", {}).get("roi_layer", {}).get("sampling_ratio", 0),
                "reg_roi_scale_factor": float(roi.get("reg_roi_scale_factor", 1.3)),
                "conv_channels": head["conv_out_channels"],
                "num_conv_blocks": head["num_convs"],
                "fc_channels": head["fc_out_channels"],
                "bbox_reg_stds": [float(s) for s in head["bbox_coder"]["target_stds"]],
                "cls_loss_weight": float(head["loss_cls"]["loss_weight"]),
                "reg_loss_weight": float(head["loss_bbox"]["loss_weight"]),
                "smooth_l1_beta": float(head["loss_bbox"].get("beta", 1.0)),
            },
        }
        if "data_preprocessor" in model_cfg:
            pre = model_cfg["data_preprocessor"]
            data["image_mean"] = [float(v) for v in pre["mean"]]
            data["image_std"] = [float(v) for v in pre["std"]]
            data["size_divisible"] = pre.get("pad_size_divisor", 32)
        if "rpn" in test_cfg:
            t = test_cfg["rpn"]
            data["rpn"].update(
                pre_nms_top_n_test=t["nms_pre"],
                post_nms_top_n_test=t["max_per_img"],
                nms_thresh=t["nms"]["iou_threshold"],
            )
        if "rpn_proposal" in train_cfg:
            t = train_cfg["rpn_proposal"]
            data["rpn"].update(pre_nms_top_n_train=t["nms_pre"], post_nms_top_n_train=t["max_per_img"])
        if "rcnn" in test_cfg:
            t = test_cfg["rcnn"]
            data["roi_head"].update(
                score_thresh=float(t["score_thr"]),
                nms_thresh=float(t["nms"]["iou_threshold"]),
                detections_per_img=t["max_per_img"],
            )
    except KeyError as err:
        raise MMDetImportError(f"mmdet model config lacks key {err}") from err
    for section, values in overrides.items():
        if isinstance(values, Mapping):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return from_mapping(ModelConfig, data, "model")


def load_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an mmdet checkpoint file or a bare state dict, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mmdet checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise MMDetImportError(
            f"{path} cannot be loaded with weights_only=True ({err}). Re-save only its tensors, e.g. in a "
            "trusted environment: torch.save(torch.load(p, weights_only=False)['state_dict'], 'sd.pth')"
        ) from err
    if not isinstance(obj, Mapping):
        raise MMDetImportError(f"{path}: expected a dict, got {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    meta = obj.get("meta", {}) if "state_dict" in obj else {}
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise MMDetImportError(f"{path}: no tensors found")
    return tensors, dict(meta) if isinstance(meta, Mapping) else {}


def infer_config(state: Mapping[str, Tensor]) -> ModelConfig:
    """Read depth, widths and class count off an mmdet Double-Head state dict (mmdet defaults elsewhere)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in state)
    depth = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101, (36, True): 152}.get(
        (len(blocks), bottleneck)
    )
    if depth is None:
        raise MMDetImportError(f"cannot infer the ResNet depth ({len(blocks)} blocks in layer3)")
    fc_cls = state["roi_head.bbox_head.fc_cls.weight"]
    conv_blocks = {int(m.group(1)) for k in state if (m := re.match(r"roi_head\.bbox_head\.conv_branch\.(\d+)\.", k))}
    return from_mapping(
        ModelConfig,
        {
            "num_classes": fc_cls.shape[0] - 1,
            "backbone": {"depth": depth},
            "fpn": {"out_channels": state["neck.fpn_convs.0.conv.weight"].shape[0]},
            "roi_head": {
                "conv_channels": state["roi_head.bbox_head.res_block.conv2.conv.weight"].shape[0],
                "num_conv_blocks": len(conv_blocks),
                "fc_channels": fc_cls.shape[1],
            },
        },
        "model",
    )

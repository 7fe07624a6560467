"""Model configuration: presets, YAML loading, validation errors that name the key, parameter counts."""

from __future__ import annotations

import pytest

from model import build_detector, load_model_config, model_config
from model.typed_config import ConfigError, parse_dotted


def test_dh_r50_fpn_parameter_counts():
    model = build_detector("dh_r50_fpn", num_classes=80)
    assert sum(p.numel() for p in model.parameters()) == 47_340_512
    assert sum(p.numel() for p in model.roi_heads.parameters()) == 19_894_161
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 225_344  # stem + layer1 (mmdet frozen_stages=1); BN affine of layer2-4 trains


def test_presets_and_variants():
    cfg = model_config("dh_r101_fpn", 3)
    assert cfg.backbone.depth == 101 and cfg.roi_head.head == "double"
    ext = model_config("dh_r50_fpn", 80, roi_head={"head": "double_ext"})
    assert ext.roi_head.head == "double_ext" and ext.roi_head.conv_channels == 1024
    fc = model_config("frcnn_r50_fpn", 80)
    assert (fc.roi_head.head, fc.roi_head.cls_loss_weight, fc.roi_head.smooth_l1_beta) == ("fc", 1.0, 0.0)
    model = build_detector("dh_r50_fpn", 80, roi_head={"head": "double_ext"})
    extra = sum(p.numel() for p in model.roi_heads.parameters()) - 19_894_161
    assert extra == (1024 * 81 + 81) + (1024 * 320 + 320)  # conv-branch classifier + fc-branch regressor


def test_yaml_roundtrip(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny\nnum_classes: 5\nroi_head:\n  head: double_ext\n  ext_lambda_fc: 0.6\n")
    cfg = load_model_config(path)
    assert (cfg.num_classes, cfg.backbone.depth, cfg.roi_head.head, cfg.roi_head.ext_lambda_fc) == (
        5,
        18,
        "double_ext",
        0.6,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"roi_head": {"hed": "fc"}}, "unknown key model.roi_head.hed"),
        ({"roi_head": {"head": "triple"}}, "model.roi_head.head: expected one of"),
        ({"rpn": {"nms_thresh": "high"}}, "model.rpn.nms_thresh: expected a number"),
        ({"backbone": {"depth": 42}}, "model.backbone.depth"),
        ({"roi_head": {"ext_lambda_fc": 1.5}}, "roi_head.ext_lambda_fc"),
        ({"rpn": {"anchor_strides": [4, 8]}}, "rpn.anchor_strides"),
    ],
)
def test_validation_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        model_config("tiny", 3, **overrides)


def test_unknown_preset_and_bad_num_classes():
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("yolo", 3)
    with pytest.raises(ConfigError, match="num_classes"):
        model_config("tiny", 0)


def test_parse_dotted_overrides():
    assert parse_dotted(["roi_head.head=fc", "rpn.nms_thresh=0.6", "channels_last=true"]) == {
        "roi_head": {"head": "fc"},
        "rpn": {"nms_thresh": 0.6},
        "channels_last": True,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_dotted(["roi_head.head"])

"""Parity of the Double-Head box head and its losses with mmdetection's ``DoubleConvFCBBoxHead``
(every ``head_*.pt`` in the fixture folder; widths, class count and loss case all read from the file)."""

from __future__ import annotations

import copy

import pytest
import torch

from model.box_coder import DeltaXYWHBoxCoder
from model.box_head import DoubleHeadBoxHead
from model.losses import BoxHeadOutput, accuracy, double_head_losses
from model.mmdet_import import convert_head_state_dict
from tests.mmdet_fixtures import bg_first, fixture_files, load, rel

HEAD_FILES = fixture_files("head_*.pt")

# Tolerances (rel = max|got − ref| / max|ref|). "README §4" is the fixture README's float32-vs-float64 figure for
# mmdet itself; "measured" is this implementation on the vendored files (C=3, 5) and the alternative ones of the
# README (C=7, 20, 80), at 1 and 2 torch threads.
#
# Float32 forward. README §4: 3.0e-7 / 3.3e-7 rel. Measured ≤ 6.0e-8 (logits) and 0 (deltas).
FORWARD_REL = 1e-5
# Float64 forward against mmdet's float64 run of the same weights and inputs. Measured ≤ 2.2e-16 (float64
# rounding only); float32 arithmetic anywhere in our head would show as ≥ 1e-8.
FORWARD_FP64_REL = 1e-9
# Regression targets. Measured ≤ 6.0e-8 abs (targets within ±3: float32 rounding).
TARGETS_ATOL = 1e-5
# Losses against mmdet's float32 and float64 values. README §4: ≤ 1.3e-7 rel. Measured ≤ 6.7e-8 against float32,
# ≤ 9.5e-8 against float64.
LOSS_REL = 1e-6


@pytest.fixture(scope="module", params=HEAD_FILES, ids=lambda p: p.stem)
def case(request):
    fx = load(request.param)
    c = fx["config"]
    head = DoubleHeadBoxHead(
        c["in_channels"],
        c["num_classes"],
        roi_size=c["roi_feat_size"],
        conv_channels=c["conv_out_channels"],
        num_conv_blocks=c["num_convs"],
        fc_channels=c["fc_out_channels"],
    )
    head.load_state_dict(convert_head_state_dict(fx["state_dict"]))
    return fx, head.eval()


def test_parameter_count(case):
    fx, head = case
    assert sum(p.numel() for p in head.parameters()) == fx["num_params"]


def test_forward_float32(case):
    fx, head = case
    with torch.no_grad():
        out = head(fx["x_cls"], fx["x_reg"])
    assert rel(out.cls_logits, bg_first(fx["cls_score"])) <= FORWARD_REL
    assert rel(out.box_deltas, fx["bbox_pred"]) <= FORWARD_REL


def test_forward_float64(case):
    fx, head = case
    head = head.double()
    try:
        with torch.no_grad():
            out = head(fx["x_cls"].double(), fx["x_reg"].double())
    finally:
        head.float()
    assert rel(out.cls_logits, bg_first(fx["cls_score_fp64"])) <= FORWARD_FP64_REL
    assert rel(out.box_deltas, fx["bbox_pred_fp64"]) <= FORWARD_FP64_REL


def _our_labels(mmdet_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mmdet labels (0..C−1, background C) -> ours (1..C, background 0)."""
    return (mmdet_labels + 1) % (num_classes + 1)


def test_targets_encoding(case):
    fx, _ = case
    lc = fx["loss_case"]
    coder = DeltaXYWHBoxCoder(tuple(fx["config"]["bbox_coder"]["target_stds"]))
    pos = lc["assigned_gt_inds"] >= 0
    targets = coder.encode_single(lc["gt_bboxes"][lc["assigned_gt_inds"][pos]], lc["rois"][pos, 1:])
    torch.testing.assert_close(targets, lc["bbox_targets"][pos], rtol=0, atol=TARGETS_ATOL)


def test_losses(case):
    fx, _ = case
    lc = fx["loss_case"]
    labels = _our_labels(lc["labels"], fx["num_classes"])
    out = BoxHeadOutput(bg_first(lc["cls_score"]), lc["bbox_pred"])
    cfg = lc["loss_cfg"]
    losses = double_head_losses(
        out,
        labels,
        lc["bbox_targets"],
        cls_weight=cfg["loss_cls"]["loss_weight"],
        reg_weight=cfg["loss_bbox"]["loss_weight"],
        beta=cfg["loss_bbox"]["beta"],
    )
    assert rel(losses["loss_cls"], lc["loss_cls"]) <= LOSS_REL
    assert rel(losses["loss_bbox"], lc["loss_bbox"]) <= LOSS_REL
    assert rel(losses["loss_cls"], lc["loss_cls_fp64"]) <= LOSS_REL
    assert rel(losses["loss_bbox"], lc["loss_bbox_fp64"]) <= LOSS_REL
    assert accuracy(out.cls_logits, labels).item() * 100 == lc["acc"].item()  # percent, exact


def test_a_nudged_parameter_fails_the_forward_check(case):
    """The forward check is not vacuous: one class bias moved by 1 % of the largest logit breaks it."""
    fx, head = case
    head = copy.deepcopy(head)
    with torch.no_grad():
        head.fc_cls.bias[1] += 0.01 * fx["cls_score"].abs().max()
        out = head(fx["x_cls"], fx["x_reg"])
    assert rel(out.cls_logits, bg_first(fx["cls_score"])) > FORWARD_REL
    assert rel(out.box_deltas, fx["bbox_pred"]) <= FORWARD_REL  # the other branch is untouched

"""Parity of the Double-Head box head and its losses with mmdetection's ``DoubleConvFCBBoxHead``
(every ``head_*.pt`` in the fixture folder, tolerances from its README §4)."""

from __future__ import annotations

import pytest
import torch

from model.box_coder import DeltaXYWHBoxCoder
from model.box_head import DoubleHeadBoxHead
from model.losses import BoxHeadOutput, accuracy, double_head_losses
from model.mmdet_import import convert_head_state_dict
from tests.mmdet_fixtures import bg_first, fixture_files, load, rel

HEAD_FILES = fixture_files("head_*.pt")


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
    assert rel(out.cls_logits, bg_first(fx["cls_score"])) < 1e-5
    assert rel(out.box_deltas, fx["bbox_pred"]) < 1e-5


def test_forward_float64(case):
    fx, head = case
    head = head.double()
    try:
        with torch.no_grad():
            out = head(fx["x_cls"].double(), fx["x_reg"].double())
    finally:
        head.float()
    assert rel(out.cls_logits, bg_first(fx["cls_score_fp64"])) < 1e-9
    assert rel(out.box_deltas, fx["bbox_pred_fp64"]) < 1e-9


def _our_labels(mmdet_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mmdet labels (0..C−1, background C) -> ours (1..C, background 0)."""
    return (mmdet_labels + 1) % (num_classes + 1)


def test_targets_encoding(case):
    fx, _ = case
    lc = fx["loss_case"]
    coder = DeltaXYWHBoxCoder((0.1, 0.1, 0.2, 0.2))
    pos = lc["assigned_gt_inds"] >= 0
    targets = coder.encode_single(lc["gt_bboxes"][lc["assigned_gt_inds"][pos]], lc["rois"][pos, 1:])
    torch.testing.assert_close(targets, lc["bbox_targets"][pos], rtol=1e-5, atol=1e-5)


def test_losses(case):
    fx, _ = case
    lc = fx["loss_case"]
    labels = _our_labels(lc["labels"], fx["num_classes"])
    out = BoxHeadOutput(bg_first(lc["cls_score"]), lc["bbox_pred"])
    losses = double_head_losses(out, labels, lc["bbox_targets"], cls_weight=2.0, reg_weight=2.0, beta=1.0)
    assert rel(losses["loss_cls"], lc["loss_cls"]) < 1e-6
    assert rel(losses["loss_bbox"], lc["loss_bbox"]) < 1e-6
    assert rel(losses["loss_cls"], lc["loss_cls_fp64"]) < 1e-6
    assert accuracy(out.cls_logits, labels).item() * 100 == pytest.approx(lc["acc"].item(), abs=0)

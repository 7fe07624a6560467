"""Stage-by-stage parity of the whole detector with mmdetection (every ``detector_*.pt`` in the fixture
folder). Each stage is fed the fixture's stored input to that stage (README §5); tolerances from §4."""

from __future__ import annotations

import pytest
import torch

from model.build import build_model
from model.losses import BoxHeadOutput
from model.mmdet_import import config_from_mmdet, convert_state_dict
from tests.mmdet_fixtures import bg_first, fixture_files, load, rel

DETECTOR_FILES = fixture_files("detector_*.pt")
LEVEL_KEYS = ("0", "1", "2", "3", "pool")


@pytest.fixture(scope="module", params=DETECTOR_FILES, ids=lambda p: p.stem)
def case(request):
    fx = load(request.param)
    model = build_model(config_from_mmdet(fx["model_config"]))
    model.load_state_dict(convert_state_dict(fx["state_dict"]))
    model.eval()
    fx["image_size"] = tuple(fx["img_metas"]["img_shape"])
    fx["fpn_dict"] = dict(zip(LEVEL_KEYS, fx["fpn_outs"], strict=True))
    return fx, model


def assert_same_boxes(got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """Equal as sets: every reference box has a partner within ``atol`` px (order may differ on ties)."""
    assert got.shape == ref.shape
    dist = (got[:, None, :] - ref[None, :, :]).abs().amax(dim=2)
    assert dist.min(dim=0).values.max().item() <= atol
    assert dist.min(dim=1).values.max().item() <= atol


def assert_same_detections(got: dict, fx: dict, box_atol: float = 1e-3, score_atol: float = 1e-5) -> None:
    """Same (label, box, score) set as mmdet's ``det_*`` (labels: ours 1..K = mmdet 0..K−1)."""
    ref_boxes, ref_scores, ref_labels = fx["det_bboxes"], fx["det_scores"], fx["det_labels"] + 1
    assert got["boxes"].shape == ref_boxes.shape
    dist = (got["boxes"][:, None, :] - ref_boxes[None, :, :]).abs().amax(dim=2)
    dist[got["labels"][:, None] != ref_labels[None, :]] = float("inf")
    partner = dist.argmin(dim=0)
    assert dist.min(dim=0).values.max().item() <= box_atol
    assert partner.unique().numel() == ref_boxes.shape[0]
    torch.testing.assert_close(got["scores"][partner], ref_scores, rtol=0, atol=score_atol)
    assert torch.all(got["scores"][:-1] >= got["scores"][1:])


def test_parameter_count(case):
    fx, model = case
    assert sum(p.numel() for p in model.parameters()) == fx["num_params"]


def test_preprocessing(case):
    fx, model = case
    rgb = fx["image_raw"][[2, 1, 0]]
    image_list, _ = model.transform([rgb])
    assert torch.equal(image_list.tensors, fx["inputs"])
    assert image_list.image_sizes == [fx["image_size"]]


def test_backbone_fpn(case):
    fx, model = case
    with torch.no_grad():
        feats = model.backbone(fx["inputs"])
    assert list(feats) == list(LEVEL_KEYS)
    for got, ref in zip(feats.values(), fx["fpn_outs"], strict=True):
        assert got.shape == ref.shape
        assert rel(got, ref) < 1e-4


def test_anchors(case):
    fx, model = case
    sizes = [tuple(f.shape[-2:]) for f in fx["fpn_outs"]]
    anchors = model.rpn.anchor_generator.grid_anchors(sizes, torch.device("cpu"))
    for got, ref in zip(anchors, fx["rpn_anchors"], strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_rpn_head(case):
    fx, model = case
    with torch.no_grad():
        logits, deltas = model.rpn.head(fx["fpn_outs"])
    for got, ref in zip(logits, fx["rpn_cls_scores"], strict=True):
        assert rel(got, ref) < 1e-4
    for got, ref in zip(deltas, fx["rpn_bbox_preds"], strict=True):
        assert rel(got, ref) < 1e-4


def test_rpn_proposals(case):
    fx, model = case
    anchors = torch.cat(fx["rpn_anchors"])
    boxes, scores = model.rpn.predict_proposals(fx["rpn_cls_scores"], fx["rpn_bbox_preds"], anchors, [fx["image_size"]])
    assert_same_boxes(boxes[0], fx["proposals"], atol=1e-3)
    torch.testing.assert_close(scores[0].sort().values, fx["proposal_scores"].sort().values, rtol=0, atol=0)


def test_roi_levels(case):
    fx, model = case
    pooler = model.roi_heads.box_roi_pool
    assert torch.equal(pooler.levels(fx["rois"]), fx["roi_levels"])
    assert torch.equal(pooler.levels(fx["fixed_rois"]), fx["fixed_roi_levels"])


def test_roi_features_both_branches(case):
    fx, model = case
    pooler = model.roi_heads.box_roi_pool
    k = fx["roi_feats_first_k"]
    cls_feats, reg_feats = pooler(fx["fpn_dict"], [fx["rois"][:k, 1:]])
    assert rel(cls_feats, fx["roi_cls_feats_first_k"]) < 1e-5
    assert rel(reg_feats, fx["roi_reg_feats_first_k"]) < 1e-5
    cls_feats, reg_feats = pooler(fx["fpn_dict"], [fx["fixed_rois"][:, 1:]])
    assert rel(cls_feats, fx["fixed_roi_cls_feats"]) < 1e-5
    assert rel(reg_feats, fx["fixed_roi_reg_feats"]) < 1e-5
    for level in range(4):  # the fixed RoIs reach every level, P5 included
        assert (pooler.levels(fx["fixed_rois"]) == level).any()


def test_roi_head_from_features(case):
    fx, model = case
    with torch.no_grad():
        out = model.roi_heads.box_head(fx["fixed_roi_cls_feats"], fx["fixed_roi_reg_feats"])
    assert rel(out.cls_logits, bg_first(fx["fixed_roi_cls_score"])) < 1e-4
    assert rel(out.box_deltas, fx["fixed_roi_bbox_pred"]) < 1e-4


def test_roi_head_dense_from_fpn(case):
    fx, model = case
    with torch.no_grad():
        out = model.roi_heads.box_head(*model.roi_heads.box_roi_pool(fx["fpn_dict"], [fx["rois"][:, 1:]]))
    assert rel(out.cls_logits, bg_first(fx["roi_cls_score"])) < 1e-4
    assert rel(out.box_deltas, fx["roi_bbox_pred"]) < 1e-4


def test_rcnn_postprocessing(case):
    fx, model = case
    heads = model.roi_heads
    out = BoxHeadOutput(bg_first(fx["roi_cls_score"]), fx["roi_bbox_pred"])
    proposals = [fx["rois"][:, 1:]]
    dense_boxes = heads.decode_boxes(out, proposals, [fx["image_size"]])[0]
    torch.testing.assert_close(
        dense_boxes.reshape(dense_boxes.shape[0], -1), fx["rcnn_dense_bboxes"], rtol=0, atol=1e-3
    )
    torch.testing.assert_close(heads.class_scores(out), bg_first(fx["rcnn_dense_scores"]), rtol=0, atol=1e-6)
    dets = heads.postprocess(out, proposals, [fx["image_size"]])[0]
    assert_same_detections(dets, fx)


def test_end_to_end_from_raw_image(case):
    fx, model = case
    rgb = fx["image_raw"][[2, 1, 0]]
    with torch.no_grad():
        image_list, feats = model.features([rgb])
        proposals, _ = model.rpn(image_list, feats)
        dets = model([rgb])[0]
    assert_same_boxes(proposals[0], fx["proposals"], atol=1e-3)
    assert_same_detections(dets, fx)
    assert dets["boxes"].dtype == torch.float32

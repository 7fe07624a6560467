"""Stage-by-stage parity of the whole detector with mmdetection (every ``detector_*.pt`` in the fixture folder,
trimmed format of ``tests/fixtures/mmdet/README.md``).

The dense tensors that the trimmed fixture no longer holds (normalised input, FPN levels, RPN maps, anchors) are
recomputed by our own model from ``image_raw``, compared with the stored crops and per-channel statistics, and
fed to the next stage: the RoI features and the dense RoI head run on *our* FPN, which the crop/statistics check
pins to mmdet's. Stages whose stored input is complete are fed that input: the RPN post-processing gets the
stored top-k logits and deltas (all that mmdet's post-processing reads), the RoI head the stored fixed-RoI
features, the R-CNN post-processing the stored dense head outputs. Every expectation (shapes, class count, image
size) comes from the fixture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from model.build import build_model
from model.detector import DoubleHeadRCNN
from model.losses import BoxHeadOutput
from model.mmdet_import import config_from_mmdet, convert_state_dict
from tests.mmdet_fixtures import (
    assert_digest_close,
    assert_same_boxes,
    assert_same_detections,
    bg_first,
    dense_from_topk,
    fixture_files,
    load_detector,
    num_classes,
    rel,
)

DETECTOR_FILES = fixture_files("detector_*.pt")
LEVEL_KEYS = ("0", "1", "2", "3", "pool")

# Tolerances. "README §4" is the fixture README's table: mmdet's own float32 run against the same model in
# float64 (its error budget). "Measured" is this implementation against three fixture sets at 1 and 2 torch
# threads: the vendored R-18 seed 0 (3 classes) and the README's alternative sets (section 10: R-18 seed 1 with
# 20 classes, R-50 at full width seed 2 with 80 classes); the worst figure is quoted. At 2 threads every dense
# stage is bit-identical to mmdet's (same torch build); the figures come from 1 thread.
#
# Preprocessing: the same float32 formula. Measured: bit-identical crops, statistics equal.
INPUTS_REL = 0.0
# Backbone + FPN from our own input. README §4: fp32 vs fp64 ≤ 6.4e-7 rel per level. Measured ≤ 7.4e-7.
FPN_REL = 1e-4
# Anchors: mmdet's formula in float32. README §4 recommends exact. Measured: bit-identical on every stated row.
ANCHORS_ATOL = 0.0
# RPN head on our FPN. README §4: fp32 vs fp64 ≤ 1.2e-6 (logits) / 8.0e-7 (deltas) rel. Measured ≤ 1.9e-6.
RPN_HEAD_REL = 1e-4
# RPN post-processing from the stored top-k logits and deltas: the same sigmoid of the same float32 logits,
# but taken of a gathered [k] tensor instead of mmdet's whole level, where torch's vectorised and scalar
# sigmoid paths can differ by one float32 ulp, 6.0e-8 for a score in [0.5, 1). Measured: 1 of 1,000 scores off
# by 6.0e-8 on the R-50 set (issue 10 saw the same on another seed), 0 on the others. Four ulps:
PROPOSAL_SCORE_ATOL = 2.4e-7
# Proposal boxes. README §4: decode arithmetic alone differs by ≤ 8.5e-5 px between fp32 and fp64; end to end
# 7.6e-5 px. Measured ≤ 6.1e-5 px from the stored top-k, ≤ 2.0e-4 px end to end.
PROPOSAL_BOX_ATOL = 1e-3
# RoIAlign on our FPN + stored RoIs. README §4: RoI features fp32 vs fp64 ≤ 4.4e-6 rel including the fp64 FPN.
# Measured ≤ 4.8e-7. They interpolate the FPN, so the FPN's tolerance:
ROI_FEATS_REL = 1e-4
# RoI head (from stored features, or our FPN + stored RoIs). README §4: ≤ 1.3e-6 / 5.1e-7 rel. Measured ≤ 2.0e-6.
ROI_HEAD_REL = 1e-4
# R-CNN post-processing from the stored head outputs. README §4: decode alone 8.5e-5 px and softmax 6.8e-8
# between fp32 and fp64. Measured ≤ 1.2e-4 px and ≤ 1.2e-7.
RCNN_BOX_ATOL = 1e-3
RCNN_SCORE_ATOL = 1e-6
# Detections end to end. README §4: boxes 6.0e-5 px, scores 1.1e-6 between fp32 and fp64 (smallest gap between
# det_scores 9.2e-6). Measured ≤ 1.8e-4 px and ≤ 1.3e-6.
DET_BOX_ATOL = 1e-3
DET_SCORE_ATOL = 1e-5


@dataclass
class Ours:
    """What our model computes from the fixture's ``image_raw``, captured in one forward pass."""

    inputs: Tensor  # [1, 3, H, W] normalised (and padded) batch
    image_sizes: list[tuple[int, int]]
    features: dict[str, Tensor]  # P2..P6 under LEVEL_KEYS
    rpn_logits: list[Tensor]  # per level [1, A, H_l, W_l]
    rpn_deltas: list[Tensor]  # per level [1, 4A, H_l, W_l]
    proposals: Tensor  # [P, 4]
    detections: dict[str, Tensor]


@dataclass
class Case:
    fx: dict
    model: DoubleHeadRCNN
    ours: Ours

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.fx["img_metas"]["img_shape"])


def run_ours(model: DoubleHeadRCNN, image_bgr: Tensor) -> Ours:
    captured: dict = {}
    hooks = [
        model.backbone.register_forward_pre_hook(lambda m, args: captured.__setitem__("inputs", args[0])),
        model.backbone.register_forward_hook(lambda m, args, out: captured.__setitem__("features", out)),
        model.rpn.head.register_forward_hook(lambda m, args, out: captured.__setitem__("rpn", out)),
        model.rpn.register_forward_hook(
            lambda m, args, out: captured.update(image_list=args[0], proposals=out.proposals)
        ),
    ]
    try:
        with torch.no_grad():
            detections = model([image_bgr[[2, 1, 0]]])[0]
    finally:
        for hook in hooks:
            hook.remove()
    return Ours(
        inputs=captured["inputs"],
        image_sizes=captured["image_list"].image_sizes,
        features=captured["features"],
        rpn_logits=captured["rpn"][0],
        rpn_deltas=captured["rpn"][1],
        proposals=captured["proposals"][0],
        detections=detections,
    )


@pytest.fixture(scope="module", params=DETECTOR_FILES, ids=lambda p: p.stem)
def case(request) -> Case:
    fx = load_detector(request.param)
    model = build_model(config_from_mmdet(fx["model_config"]))
    model.load_state_dict(convert_state_dict(fx["state_dict"]))
    model.eval()
    return Case(fx, model, run_ours(model, fx["image_raw"]))


def test_model_matches_the_fixture_config(case):
    fx, model = case.fx, case.model
    assert sum(p.numel() for p in model.parameters()) == fx["num_params"]
    assert model.num_classes == num_classes(fx) == fx["num_classes"]
    assert model.roi_heads.box_head.fc_cls.out_features == num_classes(fx) + 1


def test_preprocessing(case):
    assert_digest_close(case.ours.inputs, case.fx["inputs_digest"], INPUTS_REL, "inputs")
    assert case.ours.image_sizes == [case.image_size]


def test_backbone_fpn(case):
    feats = case.ours.features
    assert list(feats) == list(LEVEL_KEYS)
    for level, (got, digest) in enumerate(zip(feats.values(), case.fx["fpn_outs_digest"], strict=True)):
        assert_digest_close(got, digest, FPN_REL, f"FPN level {level}")


def test_anchors(case):
    sizes = [tuple(shape[-2:]) for shape in case.fx["fpn_shapes"]]
    anchors = case.model.rpn.anchor_generator.grid_anchors(sizes, torch.device("cpu"))
    for got, digest in zip(anchors, case.fx["rpn_anchors_digest"], strict=True):
        assert tuple(got.shape) == tuple(digest["shape"])
        torch.testing.assert_close(got[digest["rows"]], digest["values"], rtol=0, atol=ANCHORS_ATOL)


def check_rpn_head(fx: dict, logits: list[Tensor], deltas: list[Tensor]) -> None:
    """Our RPN maps against the digests and, at mmdet's top-k anchors, against the stored values."""
    for level, (got, digest, inds, ref) in enumerate(
        zip(logits, fx["rpn_cls_scores_digest"], fx["rpn_topk_inds"], fx["rpn_topk_cls_scores"], strict=True)
    ):
        assert_digest_close(got, digest, RPN_HEAD_REL, f"RPN logits level {level}")
        scale = digest["channel_max_abs"].max().item()
        assert (got[0].permute(1, 2, 0).reshape(-1)[inds] - ref).abs().max().item() <= RPN_HEAD_REL * scale
    for level, (got, digest, inds, ref) in enumerate(
        zip(deltas, fx["rpn_bbox_preds_digest"], fx["rpn_topk_inds"], fx["rpn_topk_bbox_preds"], strict=True)
    ):
        assert_digest_close(got, digest, RPN_HEAD_REL, f"RPN deltas level {level}")
        scale = digest["channel_max_abs"].max().item()
        assert (got[0].permute(1, 2, 0).reshape(-1, 4)[inds] - ref).abs().max().item() <= RPN_HEAD_REL * scale


def test_rpn_head(case):
    check_rpn_head(case.fx, case.ours.rpn_logits, case.ours.rpn_deltas)


def stored_rpn_maps(fx: dict) -> tuple[list[Tensor], list[Tensor]]:
    """RPN maps holding the stored top-k logits/deltas; the anchors mmdet did not keep get logit −inf."""
    logits = [
        dense_from_topk(v, i, d["shape"], float("-inf"))
        for v, i, d in zip(fx["rpn_topk_cls_scores"], fx["rpn_topk_inds"], fx["rpn_cls_scores_digest"], strict=True)
    ]
    deltas = [
        dense_from_topk(v, i, d["shape"], 0.0)
        for v, i, d in zip(fx["rpn_topk_bbox_preds"], fx["rpn_topk_inds"], fx["rpn_bbox_preds_digest"], strict=True)
    ]
    return logits, deltas


def test_rpn_proposals_from_stored_topk(case):
    fx, rpn = case.fx, case.model.rpn
    logits, deltas = stored_rpn_maps(fx)
    sizes = [tuple(shape[-2:]) for shape in fx["fpn_shapes"]]
    anchors = torch.cat(rpn.anchor_generator.grid_anchors(sizes, torch.device("cpu")))
    boxes, scores = rpn.predict_proposals(logits, deltas, anchors, [case.image_size])
    assert_same_boxes(boxes[0], fx["proposals"], atol=PROPOSAL_BOX_ATOL)
    torch.testing.assert_close(
        scores[0].sort().values, fx["proposal_scores"].sort().values, rtol=0, atol=PROPOSAL_SCORE_ATOL
    )


def test_roi_levels(case):
    pooler = case.model.roi_heads.box_roi_pool
    assert torch.equal(pooler.levels(case.fx["rois"]), case.fx["roi_levels"])
    assert torch.equal(pooler.levels(case.fx["fixed_rois"]), case.fx["fixed_roi_levels"])
    assert set(pooler.levels(case.fx["fixed_rois"]).tolist()) == set(range(len(pooler.strides)))  # P5 included


def test_roi_features_both_branches(case):
    fx, pooler = case.fx, case.model.roi_heads.box_roi_pool
    k = fx["roi_feats_first_k"]
    cls_feats, reg_feats = pooler(case.ours.features, [fx["rois"][:k, 1:]])
    assert rel(cls_feats, fx["roi_cls_feats_first_k"]) <= ROI_FEATS_REL
    assert rel(reg_feats, fx["roi_reg_feats_first_k"]) <= ROI_FEATS_REL
    cls_feats, reg_feats = pooler(case.ours.features, [fx["fixed_rois"][:, 1:]])
    assert rel(cls_feats, fx["fixed_roi_cls_feats"]) <= ROI_FEATS_REL
    assert rel(reg_feats, fx["fixed_roi_reg_feats"]) <= ROI_FEATS_REL


def test_roi_head_from_stored_features(case):
    fx = case.fx
    with torch.no_grad():
        out = case.model.roi_heads.box_head(fx["fixed_roi_cls_feats"], fx["fixed_roi_reg_feats"])
    assert rel(out.cls_logits, bg_first(fx["fixed_roi_cls_score"])) <= ROI_HEAD_REL
    assert rel(out.box_deltas, fx["fixed_roi_bbox_pred"]) <= ROI_HEAD_REL


def test_roi_head_dense_from_our_fpn(case):
    fx, heads = case.fx, case.model.roi_heads
    with torch.no_grad():
        out = heads.box_head(*heads.box_roi_pool(case.ours.features, [fx["rois"][:, 1:]]))
    assert rel(out.cls_logits, bg_first(fx["roi_cls_score"])) <= ROI_HEAD_REL
    assert rel(out.box_deltas, fx["roi_bbox_pred"]) <= ROI_HEAD_REL


def test_rcnn_postprocessing(case):
    fx, heads = case.fx, case.model.roi_heads
    out = BoxHeadOutput(bg_first(fx["roi_cls_score"]), fx["roi_bbox_pred"])
    proposals = [fx["rois"][:, 1:]]
    dense_boxes = heads.decode_boxes(out, proposals, [case.image_size])[0]
    torch.testing.assert_close(
        dense_boxes.reshape(dense_boxes.shape[0], -1), fx["rcnn_dense_bboxes"], rtol=0, atol=RCNN_BOX_ATOL
    )
    torch.testing.assert_close(
        heads.box_head.class_scores(out), bg_first(fx["rcnn_dense_scores"]), rtol=0, atol=RCNN_SCORE_ATOL
    )
    dets = heads.postprocess(out, proposals, [case.image_size])[0]
    assert_same_detections(dets, fx, RCNN_BOX_ATOL, RCNN_SCORE_ATOL)


def test_end_to_end_from_raw_image(case):
    assert_same_boxes(case.ours.proposals, case.fx["proposals"], atol=PROPOSAL_BOX_ATOL)
    assert_same_detections(case.ours.detections, case.fx, DET_BOX_ATOL, DET_SCORE_ATOL)
    assert case.ours.detections["boxes"].dtype == torch.float32


def test_the_comparisons_catch_perturbations(case):
    """The checks above are not vacuous: nudged copies of our outputs or of the fixture's make them fail."""
    fx, ours = case.fx, case.ours
    digest = fx["fpn_outs_digest"][0]
    s, (y, x) = digest["crop_size"], digest["crop_at"][1]
    scale = digest["channel_max_abs"].max().item()
    # one FPN value inside the centre window, by 10x the tolerance
    p2 = ours.features["0"].clone()
    p2[0, 0, y, x] += 10 * FPN_REL * scale
    with pytest.raises(AssertionError, match="FPN"):
        assert_digest_close(p2, digest, FPN_REL, "FPN")
    # one FPN value outside every window: only the channel statistics see it
    p2 = ours.features["0"].clone()
    h, w = p2.shape[-2:]
    p2[0, 0, y + s, x + s] += 10 * FPN_REL * scale * h * w
    with pytest.raises(AssertionError, match="FPN"):
        assert_digest_close(p2, digest, FPN_REL, "FPN")
    # one weight of the RPN head (its objectness bias) nudged
    head = copy.deepcopy(case.model.rpn.head)
    with torch.no_grad():
        head.cls_logits.bias[0] += 10 * RPN_HEAD_REL * fx["rpn_cls_scores_digest"][0]["channel_max_abs"].max()
        logits, deltas = head(list(ours.features.values()))
    with pytest.raises(AssertionError, match="RPN logits"):
        check_rpn_head(fx, logits, deltas)
    # the fixture's own proposals and detections pass the set comparisons; a copy with one proposal moved by
    # twice the tolerance, one detection score raised by twice the tolerance, or one label changed fails them
    assert_same_boxes(fx["proposals"], fx["proposals"], atol=PROPOSAL_BOX_ATOL)
    bad = fx["proposals"].clone()
    bad[len(bad) // 2, 2] += 2 * PROPOSAL_BOX_ATOL
    with pytest.raises(AssertionError, match="boxes differ"):
        assert_same_boxes(fx["proposals"], bad, atol=PROPOSAL_BOX_ATOL)
    stored = {"boxes": fx["det_bboxes"], "scores": fx["det_scores"], "labels": fx["det_labels"] + 1}
    assert_same_detections(stored, fx, DET_BOX_ATOL, DET_SCORE_ATOL)
    bad = {**fx, "det_scores": fx["det_scores"].clone()}
    bad["det_scores"][-1] += 2 * DET_SCORE_ATOL
    with pytest.raises(AssertionError, match="scores differ"):
        assert_same_detections(stored, bad, DET_BOX_ATOL, DET_SCORE_ATOL)
    bad = {**fx, "det_labels": fx["det_labels"].clone()}
    bad["det_labels"][0] = (bad["det_labels"][0] + 1) % num_classes(fx)
    with pytest.raises(AssertionError, match="label"):
        assert_same_detections(stored, bad, DET_BOX_ATOL, DET_SCORE_ATOL)
    # one stored dense head output
    bad = fx["roi_bbox_pred"].clone()
    bad[0, 0] += 10 * ROI_HEAD_REL * bad.abs().max()
    with torch.no_grad():
        out = case.model.roi_heads.box_head(*case.model.roi_heads.box_roi_pool(ours.features, [fx["rois"][:1, 1:]]))
    assert rel(out.box_deltas, bad[:1]) > ROI_HEAD_REL

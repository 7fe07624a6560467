"""The criteria (model/criterion.py) and the detector's outputs: golden loss values per head kind, the config
-> criterion table, and validation loss from an eval-mode pass with targets."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
import torch

from model import build_criterion, build_model, model_config
from model.build import ROI_HEAD_KINDS
from model.config import HeadKind
from model.criterion import DetectionCriterion, DoubleHeadExtCriterion, RoICriterion, RPNCriterion
from model.outputs import BoxHeadOutput, DetectorOutputs, RoIOutputs, RoITargets, RPNOutputs, RPNTargets

# per kind: the roi_head overrides of the config; the RPN weights are 1.5 / 0.5 for every kind
ROI_HEAD = {
    "fc": {"cls_loss_weight": 1.0, "reg_loss_weight": 1.0, "smooth_l1_beta": 0.0},
    "double": {},
    "double_ext": {
        "ext_omega_fc": 1.5,
        "ext_lambda_fc": 0.6,
        "ext_omega_conv": 2.0,
        "ext_lambda_conv": 0.9,
        "smooth_l1_beta": 0.5,
    },
}
RPN = {"cls_loss_weight": 1.5, "reg_loss_weight": 0.5}
# What the training-mode forward of main (before issue 11 moved the losses out of it) computed from the outputs
# of synthetic_outputs() with these configs: its RPN formula and ``DoubleHeadRoIHeads.losses``.
GOLDEN = {
    "fc": {
        "loss_rpn_cls": 0.9966933131217957,
        "loss_rpn_bbox": 1.1221966743469238,
        "loss_cls": 1.8102166652679443,
        "loss_bbox": 4.367077350616455,
    },
    "double": {
        "loss_rpn_cls": 0.9966933131217957,
        "loss_rpn_bbox": 1.1221966743469238,
        "loss_cls": 3.6204333305358887,
        "loss_bbox": 5.78631067276001,
    },
    "double_ext": {
        "loss_rpn_cls": 0.9966933131217957,
        "loss_rpn_bbox": 1.1221966743469238,
        "loss_cls_fc": 1.629194974899292,
        "loss_bbox_fc": 1.7816400527954102,
        "loss_cls_conv": 0.3560955822467804,
        "loss_bbox_conv": 6.379322528839111,
    },
}


def synthetic_outputs(ext: bool, seed: int = 0) -> DetectorOutputs:
    """Seeded outputs and targets: 2 images, K = 3, two RPN levels (4x6, 2x3) of 3 anchors, 10 sampled RoIs."""
    g = torch.Generator().manual_seed(seed)
    b, a, k, n = 2, 3, 3, 10
    sizes = [(4, 6), (2, 3)]
    objectness = [torch.randn(b, a, h, w, generator=g) for h, w in sizes]
    deltas = [torch.randn(b, 4 * a, h, w, generator=g) for h, w in sizes]
    num = sum(h * w for h, w in sizes) * a
    labels = torch.randint(-1, 2, (b, num), generator=g).float()
    reg = torch.randn(b, num, 4, generator=g)
    pos = (labels == 1) & (torch.rand(b, num, generator=g) < 0.6)
    neg = (labels == 0) & (torch.rand(b, num, generator=g) < 0.5)
    roi_labels = torch.randint(0, k + 1, (n,), generator=g)
    roi_reg = torch.randn(n, 4, generator=g)
    head = [torch.randn(n, k + 1, generator=g), torch.randn(n, 4 * k, generator=g)]
    head += [torch.randn(n, k + 1, generator=g), torch.randn(n, 4 * k, generator=g)] if ext else [None, None]
    rpn = RPNOutputs(
        objectness=objectness,
        deltas=deltas,
        anchors=torch.zeros(num, 4),
        proposals=[torch.zeros(0, 4)] * b,
        targets=RPNTargets(labels=labels, reg_targets=reg, sampled_pos=pos, sampled_neg=neg),
    )
    roi = RoIOutputs(
        head=BoxHeadOutput(*head),
        rois=[torch.zeros(6, 4), torch.zeros(4, 4)],
        targets=RoITargets(labels=roi_labels, reg_targets=roi_reg),
    )
    return DetectorOutputs(rpn=rpn, roi=roi)


@pytest.mark.parametrize("kind", list(GOLDEN))
def test_criterion_gives_the_golden_losses_of_main(kind):
    criterion = build_criterion(model_config("tiny", 3, roi_head={"head": kind, **ROI_HEAD[kind]}, rpn=RPN))
    losses = criterion(synthetic_outputs(ext=kind == "double_ext"))
    assert list(losses) == list(GOLDEN[kind])
    for key, value in GOLDEN[kind].items():
        assert losses[key].dtype == torch.float32 and losses[key].dim() == 0
        assert losses[key].item() == pytest.approx(value, rel=1e-6), key


def test_build_criterion_follows_the_config():
    cfg = model_config("tiny", 3, roi_head={"head": "double_ext", **ROI_HEAD["double_ext"]}, rpn=RPN)
    assert build_criterion(cfg) == DetectionCriterion(
        rpn=RPNCriterion(cls_weight=1.5, reg_weight=0.5),
        roi=DoubleHeadExtCriterion(omega_fc=1.5, lambda_fc=0.6, omega_conv=2.0, lambda_conv=0.9, beta=0.5),
    )
    fc = build_criterion(model_config("frcnn_r50_fpn", 80))
    assert fc.roi == RoICriterion(cls_weight=1.0, reg_weight=1.0, beta=0.0)
    assert build_criterion(model_config("dh_r50_fpn", 80)).roi == RoICriterion(cls_weight=2.0, reg_weight=2.0)


def test_every_configurable_head_kind_has_its_parts():
    assert set(ROI_HEAD_KINDS) == set(get_args(HeadKind))


def test_outputs_without_targets_are_refused():
    outputs = synthetic_outputs(ext=False)
    criterion = DetectionCriterion(rpn=RPNCriterion(), roi=RoICriterion())
    outputs.roi.targets = None
    with pytest.raises(ValueError, match="RoI outputs carry no targets"):
        criterion(outputs)
    outputs.rpn.targets = None
    with pytest.raises(ValueError, match="RPN outputs carry no targets"):
        criterion(outputs)


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def test_training_outputs_have_the_documented_shapes():
    cfg = model_config("tiny", 3)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, targets = _batch()
    out = model(images, targets)
    assert isinstance(out, DetectorOutputs)
    rpn, roi = out.rpn, out.roi
    per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in rpn.objectness]
    num_anchors = sum(per_level)
    assert rpn.anchors.shape == (num_anchors, 4)
    assert [d.shape[1] for d in rpn.deltas] == [4 * o.shape[1] for o in rpn.objectness]
    assert rpn.targets is not None and rpn.targets.labels.shape == (2, num_anchors)
    assert rpn.targets.reg_targets.shape == (2, num_anchors, 4)
    assert rpn.targets.sampled_pos.dtype == torch.bool and rpn.targets.sampled_neg.shape == (2, num_anchors)
    assert (rpn.targets.labels[rpn.targets.sampled_pos] == 1).all()
    assert (rpn.targets.labels[rpn.targets.sampled_neg] == 0).all()
    assert all(len(p) <= cfg.rpn.post_nms_top_n_train for p in rpn.proposals)
    n = sum(len(r) for r in roi.rois)
    assert all(len(r) <= cfg.roi_head.batch_size_per_image for r in roi.rois)
    assert roi.head.cls_logits.shape == (n, 4) and roi.head.box_deltas.shape == (n, 12)
    assert roi.targets is not None and roi.targets.labels.shape == (n,) and roi.targets.reg_targets.shape == (n, 4)
    with pytest.raises(ValueError, match="targets are required in training mode"):
        model(images)


@pytest.mark.parametrize("kind", list(ROI_HEAD_KINDS))
def test_eval_with_targets_gives_the_same_detections_and_a_validation_loss(kind):
    cfg = model_config("tiny", 3, roi_head={"head": kind})  # tiny: batch-statistics BatchNorm in training
    torch.manual_seed(0)
    model, criterion = build_model(cfg), build_criterion(cfg)
    images, targets = _batch()
    model.eval()
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        plain = model(images)
        detections, outputs = model(images, targets)
        losses = criterion(outputs)
    assert len(detections) == len(plain) == 2
    for got, ref in zip(detections, plain, strict=True):
        assert got.keys() == ref.keys() == {"boxes", "scores", "labels"}
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert list(losses) == list(GOLDEN[kind])  # the training loss's keys
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items()), "an eval pass with targets changed the state"
    # test-time proposal counts; the RoIs are sampled from them plus the gt boxes (labels in 1..K for those)
    assert all(len(p) <= cfg.rpn.post_nms_top_n_test for p in outputs.rpn.proposals)
    rois = outputs.roi.rois[0]
    assert len(rois) <= cfg.roi_head.batch_size_per_image
    assert all((rois == box).all(dim=1).any() for box in targets[0]["boxes"])
    assert outputs.roi.targets is not None and (outputs.roi.targets.labels[: len(rois)] > 0).sum() >= 2
    # not vacuous: the same pass in training mode updates the BatchNorm running statistics
    model.train()
    with torch.no_grad():
        model(images, targets)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in state.items() if "running_mean" in k)

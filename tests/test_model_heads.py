"""Head variants: Double-Head-Ext fusion by hand, loss weighting, RPN assignment rules, golden losses."""

from __future__ import annotations

import math

import pytest
import torch

from model import build_criterion, build_detector, build_model, model_config
from model.box_head import DoubleHeadBoxHead, TwoFCBoxHead, fuse_ext_scores
from model.losses import BoxHeadOutput, cls_loss, double_head_ext_losses, reg_loss


def test_ext_fusion_matches_hand_computation():
    fc = torch.tensor([[2.0, 0.0, -1.0]])
    conv = torch.tensor([[0.0, 1.0, 1.0]])
    e = math.exp
    s_fc = [e(2) / (e(2) + 1 + e(-1)), 1 / (e(2) + 1 + e(-1)), e(-1) / (e(2) + 1 + e(-1))]
    s_conv = [1 / (1 + 2 * e(1)), e(1) / (1 + 2 * e(1)), e(1) / (1 + 2 * e(1))]
    expected = torch.tensor([[a + b * (1 - a) for a, b in zip(s_fc, s_conv, strict=True)]])
    torch.testing.assert_close(fuse_ext_scores(fc, conv), expected)
    # probabilistic OR: never below either head, 1 - (1 - s_fc)(1 - s_conv)
    torch.testing.assert_close(fuse_ext_scores(fc, conv), 1 - (1 - torch.softmax(fc, 1)) * (1 - torch.softmax(conv, 1)))


def test_ext_loss_weights():
    torch.manual_seed(0)
    n, k = 6, 3
    out = BoxHeadOutput(torch.randn(n, k + 1), torch.randn(n, 4 * k), torch.randn(n, k + 1), torch.randn(n, 4 * k))
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    targets = torch.randn(n, 4)
    losses = double_head_ext_losses(out, labels, targets)
    torch.testing.assert_close(losses["loss_cls_fc"], 1.4 * cls_loss(out.cls_logits, labels))
    torch.testing.assert_close(losses["loss_bbox_fc"], 0.6 * reg_loss(out.box_deltas_fc, labels, targets))
    torch.testing.assert_close(losses["loss_cls_conv"], 0.5 * cls_loss(out.cls_logits_conv, labels))
    torch.testing.assert_close(losses["loss_bbox_conv"], 2.0 * reg_loss(out.box_deltas, labels, targets))
    custom = double_head_ext_losses(out, labels, targets, omega_fc=1.0, lambda_fc=0.5, omega_conv=1.0, lambda_conv=0.5)
    torch.testing.assert_close(custom["loss_cls_fc"], 0.5 * cls_loss(out.cls_logits, labels))


def test_reg_loss_uses_true_class_and_all_rois():
    deltas = torch.zeros(4, 8)  # K = 2
    deltas[1, 4:8] = torch.tensor([0.5, 0.0, 0.0, 2.0])  # RoI 1, class 2
    labels = torch.tensor([0, 2, 0, 0])
    targets = torch.zeros(4, 4)
    # smooth-L1(beta=1): 0.5 * 0.5^2 + (2 - 0.5) = 1.625, divided by all 4 RoIs
    assert reg_loss(deltas, labels, targets, beta=1.0).item() == pytest.approx(1.625 / 4, rel=1e-6)
    assert reg_loss(deltas, labels, targets, beta=0.0).item() == pytest.approx(2.5 / 4, rel=1e-6)


def test_rpn_low_quality_match_goes_to_the_gt_it_is_best_for():
    """mmdet MaxIoUAssigner: a gt's best anchor (IoU >= 0.3) is assigned to *that* gt, not to the anchor's own
    argmax gt (torchvision's rule); ties all count; IoU < 0.3 is negative."""
    torch.manual_seed(0)
    rpn = build_detector("tiny", 2).rpn
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # A: IoU 0.4 with gt0 (gt0's best), 0.45 with gt1
            [0.0, 4.0, 10.0, 12.0],  # B: IoU 0.5625 with gt1 (gt1's best)
            [50.0, 50.0, 60.0, 60.0],  # C: far away -> negative
            [0.0, 0.0, 10.0, 10.0],  # D: same as A (a tie for gt0)
        ]
    )
    gts = torch.tensor([[0.0, 0.0, 10.0, 4.0], [0.0, 5.5, 10.0, 10.0]])
    sizes = [(1, 1)] * 5
    rpn.anchor_generator.valid_flags = lambda *a, **k: torch.ones(4, dtype=torch.bool)
    labels, matched = rpn.assign_targets(anchors, sizes, [(64, 64)], [{"boxes": gts}])
    assert labels[0].tolist() == [1.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(matched[0][[0, 1, 3]], gts[[0, 1, 0]])


def test_rpn_ignores_anchors_outside_the_image_padding():
    rpn = build_detector("tiny", 1).rpn
    sizes = [(4, 6), (2, 3), (1, 2), (1, 1), (1, 1)]  # a 16x24 batch
    flags = rpn.anchor_generator.valid_flags(sizes, (8, 24), torch.device("cpu"))  # this image: 8x24 padded
    p2 = flags[: 4 * 6 * 3].view(4, 6, 3)
    assert p2[:2].all() and not p2[2:].any()


GOLDEN = {
    # seeded tiny detector, two 96x128 images; pins every loss term (regenerate only on a deliberate change)
    "double": {"loss_rpn_cls": 0.6928494, "loss_rpn_bbox": 0.00959761, "loss_cls": 3.136168, "loss_bbox": 0.50978804},
    "double_ext": {
        "loss_rpn_cls": 0.6928494,
        "loss_rpn_bbox": 0.00959761,
        "loss_cls_fc": 2.25822496,
        "loss_bbox_fc": 0.15380652,
        "loss_cls_conv": 0.63261443,
        "loss_bbox_conv": 0.50872236,
    },
    "fc": {"loss_rpn_cls": 0.6928494, "loss_rpn_bbox": 0.00959761, "loss_cls": 2.78964639, "loss_bbox": 0.51022696},
}


def _seeded_losses(head: str) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = model_config("tiny", 3, roi_head={"head": head})
    model, criterion = build_model(cfg), build_criterion(cfg)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[20.0, 20.0, 50.0, 44.0]]), "labels": torch.tensor([2])},
    ]
    model.train()
    torch.manual_seed(2)
    return {k: v.item() for k, v in criterion(model(images, targets)).items()}


@pytest.mark.parametrize("head", list(GOLDEN))
def test_golden_losses(head):
    losses = _seeded_losses(head)
    assert set(losses) == set(GOLDEN[head])
    for key, value in GOLDEN[head].items():
        assert losses[key] == pytest.approx(value, rel=1e-4), key


def test_box_heads_own_their_test_time_scores():
    """Double-Head-Ext fuses its two classifiers at inference; Double-Head and the fc head use the fc softmax."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, 7, 7)
    ext = DoubleHeadBoxHead(8, 3, conv_channels=16, fc_channels=32, ext=True).eval()
    out = ext(x, x)
    torch.testing.assert_close(ext.class_scores(out), fuse_ext_scores(out.cls_logits, out.cls_logits_conv))
    double = DoubleHeadBoxHead(8, 3, conv_channels=16, fc_channels=32).eval()
    out = double(x, x)
    torch.testing.assert_close(double.class_scores(out), torch.softmax(out.cls_logits, 1))
    fc = TwoFCBoxHead(8, 3, fc_channels=32).eval()
    out = fc(x)
    torch.testing.assert_close(fc.class_scores(out), torch.softmax(out.cls_logits, 1))

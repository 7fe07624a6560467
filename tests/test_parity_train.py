"""Training-step parity with mmdetection 3.3.0: every ``train_*.pt`` of the fixture folder (fixture README §9).

A train fixture records one ``model.loss`` + ``backward()`` of the summed loss of the detector of its
``weights_file`` (a detector fixture of the same folder: weights and mmdet config) in train mode (``frozen_stages``,
``norm_eval``) on two images with fixed ground truth, with every random sampling decision. Here our model is built
from the same weights and config with samplers that replay those decisions (:class:`model.losses.Sampler`,
injected through :func:`model.build.build_model`), runs the same step through its public API (``model(images,
targets)`` returns the raw outputs, ``build_criterion(cfg)`` scores them, then ``backward()`` of the sum), and must
reproduce: the train-mode proposals,
the RPN and R-CNN assignments, the sampled RoIs, each loss term (the RPN terms also per FPN level), the accuracy,
every trainable parameter's gradient (norm and sum; the whole tensor for the RPN head and the two predictors),
and which parameters are frozen.

Conventions mapped here, not differences: labels are 1..K here and 0..K−1 in mmdet; the R-CNN candidates are
``cat(proposals, gt)`` here and ``cat(gt, proposals)`` in mmdet (a recorded index is translated, and a proposal is
found by its box, so a swap of two tied proposals cannot shift the replay); parameter names and ``fc_cls``'s row
order follow ``model.mmdet_import``.

Tolerances: ``python -m tests.test_parity_train`` reruns the step with the model in float64 and prints, for each
compared quantity, the float32 noise (ours32 vs ours64) and the distance to mmdet (ours32 vs mmdet). The float64
run shares the float32 run's discrete inputs: the anchors (exact in float32, mmdet's formula), the proposals
(decoded in float32 by design; their own noise is measured separately) and the sampling. Each tolerance is about
10× the larger of the two figures, stated beside it (vendored R-18 seed-0 file, 1 torch thread, CPU). Every
expectation (class count, image size, sample counts, parameter names) is read from the fixture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
from torch import Tensor
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from model.build import build_criterion, build_model
from model.criterion import RPNCriterion
from model.detector import DoubleHeadRCNN
from model.losses import accuracy, rpn_losses
from model.mmdet_import import config_from_mmdet, convert_state_dict
from model.outputs import RPNOutputs
from tests.mmdet_fixtures import fixture_dir, fixture_files, load, load_detector, param_names_from_mmdet

TRAIN_FILES = fixture_files("train_*.pt")

# Tolerances. Measured by ``python -m tests.test_parity_train`` on the vendored R-18 seed-0 file (1 thread, CPU):
# "32v64" is ours in float32 vs ours in float64 (the float32 noise), "vs mmdet" ours in float32 vs the fixture;
# worst case over the two images. Each tolerance is 10x the larger figure, rounded up (to 1, 1.5, 2, 2.5, 3 or 5).
#
# Train-mode proposals, per image, paired with mmdet's by box. Measured: boxes 32v64 1.2e-4 px, vs mmdet 1.2e-4 px
# (2 ulps at 640 px; the float64 run also decodes in float32, so 32v64 is the float32 network's deltas only).
PROPOSAL_BOX_ATOL = 1.5e-3
# Their sigmoid scores. Measured: 32v64 2.4e-7, vs mmdet 1.8e-7 (a few ulps below 1).
PROPOSAL_SCORE_ATOL = 2.5e-6
# max_overlaps (IoU of each anchor / R-CNN candidate with its best gt). Measured: 32v64 RPN 9.8e-8, R-CNN 4.1e-8;
# vs mmdet RPN 0, R-CNN 2.7e-7 (our proposals are 1.2e-4 px from mmdet's).
IOU_ATOL = 3e-6
# Loss terms, relative to the term; the RPN terms per FPN level relative to the term's sum (a level without
# positives has a zero box loss). Measured 32v64: loss_rpn_cls 1.0e-8, loss_rpn_bbox 5.1e-8, loss_cls 1.9e-7,
# loss_bbox 3.7e-8, per level 1.2e-8 / 1.7e-8; vs mmdet: 0, 8.5e-8, 1.1e-7, 1.0e-7, per level 1.9e-8 / 4.2e-8.
LOSS_REL = 2e-6
# Gradient norms, relative to the norm, and sums, relative to the gradient's L1 norm (a sum may cancel to ~0), per
# part. The R-CNN head is the noisiest: its BatchNorms run on batch statistics (mmdet trains them so), whose
# backward subtracts the batch mean of the gradient; the gradients of its BN biases (norms ~4e-3) are such
# differences. Measured norm 32v64 / vs mmdet, sum 32v64 / vs mmdet:
#   backbone 2.8e-7 / 4.1e-7, 6.2e-7 / 3.7e-7;   neck 1.5e-6 / 5.7e-7, 1.4e-6 / 4.6e-7;
#   rpn_head 6.4e-8 / 9.8e-8, 5.7e-8 / 6.8e-8;   roi_head 4.7e-5 / 2.2e-5, 4.4e-5 / 2.8e-5.
GRAD_REL = {"backbone": 1e-5, "neck": 1.5e-5, "rpn_head": 1e-6, "roi_head": 5e-4}
# Whole gradients (rpn_head, fc_cls, fc_reg), max|diff| / max|ref| per tensor. Measured: 32v64 7.4e-7
# (rpn_conv.weight), vs mmdet 7.3e-7 (the same).
GRAD_FULL_REL = 1e-5


class ReplaySampler:
    """A :class:`model.losses.Sampler` that returns recorded indices instead of drawing them.

    ``pos`` / ``neg``: per image int64 indices into the labels it will be given (set before the call). It checks
    that they agree with our assignment (recorded positives are positive here, recorded negatives negative) and
    keeps the labels it saw.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.pos: list[Tensor] | None = None
        self.neg: list[Tensor] | None = None
        self.labels: list[Tensor] = []

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.pos is None or self.neg is None:
            raise AssertionError(f"{self.name}: no recorded sampling to replay")
        for i, (lab, pos, neg) in enumerate(zip(labels, self.pos, self.neg, strict=True)):
            if not (lab[pos] >= 1).all():
                raise AssertionError(
                    f"{self.name} image {i}: recorded positives {pos[lab[pos] < 1].tolist()} are not ours"
                )
            if not (lab[neg] == 0).all():
                raise AssertionError(
                    f"{self.name} image {i}: recorded negatives {neg[lab[neg] != 0].tolist()} are not ours"
                )
        self.labels = [lab.detach().clone() for lab in labels]
        return self.pos, self.neg


def candidates_from_mmdet(mmdet_proposals: Tensor, proposals: Tensor, num_gt: int, atol: float) -> Tensor:
    """``[G + P]`` int64: the index into our ``cat(proposals, gt)`` of each of mmdet's ``cat(gt, proposals)``.

    mmdet's proposal ``j`` is our proposal with the nearest box (within ``atol`` px, one partner each).
    """
    dist = (mmdet_proposals[:, None, :].double() - proposals[None, :, :].double()).abs().amax(dim=2)
    nearest = dist.min(dim=1)
    worst = nearest.values.max().item() if len(proposals) else 0.0
    assert worst <= atol, f"a proposal of mmdet has no partner within {atol:g} px ({worst:.3g})"
    assert nearest.indices.unique().numel() == len(mmdet_proposals), "two mmdet proposals share one of ours"
    gt = torch.arange(num_gt) + len(proposals)
    return torch.cat([gt, nearest.indices])


@dataclass
class Step:
    """What one training step of our model computed (captured from its modules; gradients after backward)."""

    model: DoubleHeadRCNN
    targets: list[dict[str, Tensor]]
    losses: dict[str, Tensor]
    rpn_level_losses: dict[str, Tensor]  # "loss_rpn_cls" / "loss_rpn_bbox": [L] per FPN level, same normalisation
    feature_sizes: list[tuple[int, int]]
    image_sizes: list[tuple[int, int]]
    proposals: list[Tensor]  # per image [P_i, 4]
    proposal_scores: list[Tensor]  # per image [P_i]
    candidates: list[Tensor]  # per image [G_i + P_i]: our index of mmdet's R-CNN candidate j
    rpn_sampler: ReplaySampler
    roi_sampler: ReplaySampler
    sampled_rois: list[Tensor]  # per image [S_i, 4], in the order the head saw them
    cls_logits: Tensor  # [sum_i S_i, K+1]
    sampled_labels: Tensor  # [sum_i S_i], 0 = background
    grads: dict[str, Tensor | None] = field(default_factory=dict)  # trainable parameters, our names
    seconds: float = 0.0


def rpn_level_losses(out: RPNOutputs, criterion: RPNCriterion) -> dict[str, Tensor]:
    """The criterion's two RPN terms per FPN level, ``[L]`` each, normalised by the whole batch's sampled count."""
    t = out.targets
    assert t is not None
    objectness, deltas = concat_box_prediction_layers(out.objectness, out.deltas)
    counts = [o[0].numel() for o in out.objectness]
    level = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]).repeat(len(t.labels))
    pos, neg = t.sampled_pos.reshape(-1), t.sampled_neg.reshape(-1)
    avg_factor = sum(
        max(int(p.sum()), 1) + max(int(n.sum()), 1) for p, n in zip(t.sampled_pos, t.sampled_neg, strict=True)
    )
    per_level = [
        rpn_losses(
            objectness.flatten().detach(),
            deltas.detach(),
            t.labels.reshape(-1),
            t.reg_targets.reshape(-1, 4),
            pos & (level == i),
            neg & (level == i),
            avg_factor,
        )
        for i in range(len(counts))
    ]
    return {
        "loss_rpn_cls": torch.stack([c for c, _ in per_level]) * criterion.cls_weight,
        "loss_rpn_bbox": torch.stack([r for _, r in per_level]) * criterion.reg_weight,
    }


def run_step(fx: dict, det: dict, dtype: torch.dtype = torch.float32, proposals=None) -> Step:
    """One training step of our model on the fixture's batch with its recorded sampling.

    ``dtype`` float64 runs the network, losses and backward in float64 (the anchors stay float32, exact as
    mmdet's); ``proposals`` (``(boxes, scores)`` per image) replaces the RPN's, to give that run the same
    R-CNN input as a float32 run.
    """
    rpn_sampler, roi_sampler = ReplaySampler("RPN sampler"), ReplaySampler("R-CNN sampler")
    rpn_sampler.pos = [r["pos_anchor_inds"] for r in fx["rpn"]]
    rpn_sampler.neg = [r["neg_anchor_inds"] for r in fx["rpn"]]
    cfg = config_from_mmdet(det["model_config"])
    model = build_model(cfg, rpn_sampler=rpn_sampler, roi_sampler=roi_sampler)
    criterion = build_criterion(cfg)
    model.load_state_dict(convert_state_dict(det["state_dict"]))
    model.to(dtype).train()
    model.rpn.anchor_generator.float()
    images = [im[[2, 1, 0]].to(dtype) for im in fx["images_bgr"]]  # BGR uint8 -> RGB 0-255
    targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(fx["gt_bboxes"], fx["gt_labels"], strict=True)]
    cap: dict = {}
    predict = model.rpn.predict_proposals

    def predict_and_map(*args, **kwargs):
        out = predict(*args, **kwargs) if proposals is None else proposals
        cap["proposals"] = out
        cap["candidates"] = [
            candidates_from_mmdet(r["proposals"], boxes, len(t["boxes"]), PROPOSAL_BOX_ATOL)
            for r, boxes, t in zip(fx["rcnn"], out[0], targets, strict=True)
        ]
        roi_sampler.pos = [c[r["pos_inds"]] for c, r in zip(cap["candidates"], fx["rcnn"], strict=True)]
        roi_sampler.neg = [c[r["neg_inds"]] for c, r in zip(cap["candidates"], fx["rcnn"], strict=True)]
        return out

    hook = model.rpn.register_forward_pre_hook(lambda m, args: cap.__setitem__("image_sizes", args[0].image_sizes))
    start = time.perf_counter()
    try:
        with mock.patch.object(model.rpn, "predict_proposals", predict_and_map):
            outputs = model(images, targets)
        losses = criterion(outputs)
        sum(losses.values()).backward()
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    assert outputs.roi.targets is not None
    return Step(
        model=model,
        targets=targets,
        losses={k: v.detach() for k, v in losses.items()},
        rpn_level_losses=rpn_level_losses(outputs.rpn, criterion.rpn),
        feature_sizes=[(int(o.shape[-2]), int(o.shape[-1])) for o in outputs.rpn.objectness],
        image_sizes=cap["image_sizes"],
        proposals=cap["proposals"][0],
        proposal_scores=cap["proposals"][1],
        candidates=cap["candidates"],
        rpn_sampler=rpn_sampler,
        roi_sampler=roi_sampler,
        sampled_rois=[r.detach() for r in outputs.roi.rois],
        cls_logits=outputs.roi.head.cls_logits.detach(),
        sampled_labels=outputs.roi.targets.labels,
        grads={n: None if p.grad is None else p.grad.detach() for n, p in model.named_parameters() if p.requires_grad},
        seconds=seconds,
    )


@dataclass
class Case:
    fx: dict
    det: dict
    step: Step

    @property
    def names(self) -> dict[str, str]:
        """mmdet parameter name -> ours, for every parameter the fixture names."""
        fx = self.fx
        return param_names_from_mmdet([*fx["frozen_params"], *fx["params_without_grad"], *fx["grad_norm"]])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_for_module():
    """One intra-op thread for the module-scoped step (two shared cores), as the README's figures."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_case(path) -> tuple[dict, dict]:
    fx = load(path)
    assert fx["kind"] == "train_step", path
    return fx, load_detector(fixture_dir() / fx["weights_file"])


@pytest.fixture(scope="module", params=TRAIN_FILES, ids=lambda p: p.stem)
def case(request, _one_torch_thread_for_module) -> Case:
    fx, det = load_case(request.param)
    return Case(fx, det, run_step(fx, det))


def loss_ref(fx: dict, key: str) -> Tensor:
    value = fx["losses"][key]
    return value["sum"] if isinstance(value, dict) else value


def assert_rel(got: Tensor, ref: Tensor, tol: float, what: str, scale: Tensor | None = None) -> float:
    """``max|got − ref| / scale ≤ tol``; ``scale`` defaults to ``|ref|`` (element-wise). Returns the error."""
    scale = ref.double().abs() if scale is None else scale.double().abs()
    err = ((got.double() - ref.double()).abs() / scale.clamp_min(1e-30)).max().item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} (ours {got.tolist()}, mmdet {ref.tolist()})"
    return err


def part(mmdet_name: str) -> str:
    return mmdet_name.split(".")[0]


# ------------------------------------------------------------------------------------------------------ tests


def test_model_matches_the_fixture_config(case):
    """Our config, built from the weights' mmdet config, has the fixture's train settings and batch."""
    fx, model = case.fx, case.step.model
    cfg = fx["train_cfg"]
    rpn, roi = model.rpn, model.roi_heads
    assert fx["num_classes"] == model.num_classes
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold, rpn.min_pos_iou) == (
        cfg["rpn"]["assigner"]["pos_iou_thr"],
        cfg["rpn"]["assigner"]["neg_iou_thr"],
        cfg["rpn"]["assigner"]["min_pos_iou"],
    )
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (
        cfg["rcnn"]["assigner"]["pos_iou_thr"],
        cfg["rcnn"]["assigner"]["neg_iou_thr"],
    )
    assert not cfg["rcnn"]["assigner"]["match_low_quality"] and cfg["rcnn"]["sampler"]["add_gt_as_proposals"]
    proposal_cfg = cfg["rpn_proposal"]
    assert rpn._pre_nms_top_n["training"] == proposal_cfg["nms_pre"]
    assert rpn._post_nms_top_n["training"] == proposal_cfg["max_per_img"]
    assert rpn.nms_thresh == proposal_cfg["nms"]["iou_threshold"] and proposal_cfg["min_bbox_size"] == 0
    for stage, recs in (("rpn", fx["rpn"]), ("rcnn", fx["rcnn"])):
        for rec in recs:
            assert len(rec["pos_inds"]) + len(rec["neg_inds"]) <= cfg[stage]["sampler"]["num"]
            assert len(rec["pos_inds"]) <= cfg[stage]["sampler"]["num"] * cfg[stage]["sampler"]["pos_fraction"]
    assert case.step.image_sizes == [tuple(fx["batch_input_shape"])] * len(fx["images_bgr"])


def test_frozen_parameters_and_gradient_coverage(case):
    """Stem and layer1 frozen (``frozen_stages``) as mmdet's, every trainable parameter got a gradient."""
    fx, step, names = case.fx, case.step, case.names
    frozen = {n for n, p in step.model.named_parameters() if not p.requires_grad}
    expected = {names[n] for n in fx["frozen_params"]}
    assert frozen == expected, (
        f"frozen here only: {sorted(frozen - expected)}; in mmdet only: {sorted(expected - frozen)}"
    )
    assert fx["params_without_grad"] == []
    assert [n for n, g in step.grads.items() if g is None] == [], "trainable parameters without a gradient"
    assert set(step.grads) == {names[n] for n in fx["grad_norm"]}


def test_train_mode_proposals(case):
    """The RPN's train-mode proposals (nms_pre, max_per_img of ``rpn_proposal``): same boxes and scores per image."""
    step = case.step
    for i, rec in enumerate(case.fx["rcnn"]):
        boxes, scores = step.proposals[i], step.proposal_scores[i]
        assert boxes.shape == rec["proposals"].shape, (i, tuple(boxes.shape))
        ours = step.candidates[i][len(case.fx["gt_bboxes"][i]) :]  # ours for each of mmdet's, in mmdet's order
        assert ours.unique().numel() == len(boxes)  # one to one (partners within PROPOSAL_BOX_ATOL: checked there)
        torch.testing.assert_close(boxes[ours], rec["proposals"], rtol=0, atol=PROPOSAL_BOX_ATOL)
        torch.testing.assert_close(scores[ours], rec["proposal_scores"], rtol=0, atol=PROPOSAL_SCORE_ATOL)
        assert torch.all(scores[:-1] >= scores[1:])


def test_rpn_assignment(case):
    """MaxIoUAssigner over the anchors: the same gt (or negative / ignored) for every anchor; the same IoUs."""
    fx, step = case.fx, case.step
    anchors = torch.cat(step.model.rpn.anchor_generator.grid_anchors(step.feature_sizes, torch.device("cpu")))
    labels, matched = step.model.rpn.assign_targets(anchors, step.feature_sizes, step.image_sizes, step.targets)
    for i, rec in enumerate(fx["rpn"]):
        gt = step.targets[i]["boxes"]
        gt_index = (matched[i][:, None, :] == gt[None]).all(dim=2).float().argmax(dim=1) + 1
        assigned = torch.where(labels[i] > 0, gt_index, labels[i].long())  # -1 ignored, 0 negative, k -> gt k−1
        inside = rec["inside_flags"]
        assert torch.equal(assigned[inside], rec["assigned_gt_inds"]), (
            i,
            (assigned[inside] != rec["assigned_gt_inds"]).sum(),
        )
        assert torch.equal(step.rpn_sampler.labels[i], labels[i])  # what the sampler saw
        max_iou = box_iou(gt, anchors).max(dim=0).values
        torch.testing.assert_close(max_iou[inside], rec["max_overlaps"], rtol=0, atol=IOU_ATOL)


def test_rcnn_assignment_and_sampled_rois(case):
    """Over ``gt + proposals``: the same gt per candidate and IoUs; the sampled RoIs in the order mmdet fed them."""
    fx, step = case.fx, case.step
    heads = step.model.roi_heads
    for i, rec in enumerate(fx["rcnn"]):
        gt, gt_labels = step.targets[i]["boxes"], step.targets[i]["labels"]
        cands = torch.cat([step.proposals[i], gt])
        matched, labels = heads.assign_targets_to_proposals([cands], [gt], [gt_labels])
        assigned = torch.where(labels[0] > 0, matched[0] + 1, 0)
        order = step.candidates[i]
        assert torch.equal(assigned[order], rec["assigned_gt_inds"]), (
            i,
            (assigned[order] != rec["assigned_gt_inds"]).sum(),
        )
        assert torch.equal(step.roi_sampler.labels[i], labels[0])  # what the sampler saw
        torch.testing.assert_close(
            box_iou(gt, cands).max(dim=0).values[order], rec["max_overlaps"], rtol=0, atol=IOU_ATOL
        )
        sampled = torch.cat([rec["pos_priors"], rec["neg_priors"]])
        torch.testing.assert_close(step.sampled_rois[i], sampled, rtol=0, atol=PROPOSAL_BOX_ATOL)
        assert (step.roi_sampler.labels[i][step.roi_sampler.pos[i]] > 0).all()
        assert torch.equal(order[rec["pos_inds"]] >= len(step.proposals[i]), rec["pos_is_gt"].bool())


def test_rpn_losses(case):
    """``loss_rpn_cls`` and ``loss_rpn_bbox``, in all and per FPN level (normalised by the whole batch's count)."""
    fx, step = case.fx, case.step
    for key in ("loss_rpn_cls", "loss_rpn_bbox"):
        assert_rel(step.losses[key], loss_ref(fx, key), LOSS_REL, key)
        per_level = fx["losses"][key]["per_level"]
        assert step.rpn_level_losses[key].shape == per_level.shape
        # relative to the whole term: a level without positives has a zero box loss
        assert_rel(step.rpn_level_losses[key], per_level, LOSS_REL, f"{key} per level", scale=per_level.sum())


def test_rcnn_losses_and_accuracy(case):
    """``loss_cls``, ``loss_bbox`` and the accuracy (mmdet: percent of all sampled RoIs, background included)."""
    fx, step = case.fx, case.step
    assert set(step.losses) == {k for k in fx["losses"] if k != "acc"}
    for key in ("loss_cls", "loss_bbox"):
        assert_rel(step.losses[key], loss_ref(fx, key), LOSS_REL, key)
    num_rois = sum(len(r["pos_inds"]) + len(r["neg_inds"]) for r in fx["rcnn"])
    assert step.sampled_labels.numel() == num_rois and step.cls_logits.shape[0] == num_rois
    correct = round(accuracy(step.cls_logits, step.sampled_labels).item() * num_rois)
    assert correct == round(fx["losses"]["acc"].item() / 100 * num_rois)
    total = sum(step.losses.values())
    assert_rel(total, fx["total_loss"], LOSS_REL, "total loss")


def test_gradient_norms_and_sums(case):
    """Every trainable parameter's gradient: L2 norm (relative) and sum (relative to its L1 norm)."""
    fx, step, names = case.fx, case.step, case.names
    worst: dict[str, float] = {}
    for name, ref_norm in fx["grad_norm"].items():
        tol = GRAD_REL[part(name)]
        grad = step.grads[names[name]].double()
        norm_err = abs(grad.norm().item() - ref_norm.item()) / ref_norm.item()
        sum_err = abs(grad.sum().item() - fx["grad_sum"][name].item()) / grad.abs().sum().item()
        assert norm_err <= tol, f"{name}: gradient norm off by {norm_err:.3g} relative > {tol:g}"
        assert sum_err <= tol, f"{name}: gradient sum off by {sum_err:.3g} of its L1 norm > {tol:g}"
        worst[part(name)] = max(worst.get(part(name), 0.0), norm_err, sum_err)
    assert set(worst) == set(GRAD_REL)


def test_full_gradients(case):
    """The whole gradient of the RPN head and of ``fc_cls`` / ``fc_reg`` (``fc_cls`` rows to background-first)."""
    step = case.step
    full = convert_state_dict(case.fx["grad_full"])
    assert len(full) == len(case.fx["grad_full"])
    for name, ref in full.items():
        got = step.grads[name]
        assert got.shape == ref.shape, name
        err = ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
        assert err <= GRAD_FULL_REL, f"{name}: gradient off by {err:.3g} of its max > {GRAD_FULL_REL:g}"


def test_the_checks_catch_perturbations(case):
    """Not vacuous: a recorded index our assignment disagrees with is refused; nudged references fail."""
    fx, step = case.fx, case.step
    sampler = ReplaySampler("RPN sampler")
    labels = step.rpn_sampler.labels
    sampler.pos = [r["pos_anchor_inds"] for r in fx["rpn"]]
    sampler.neg = [r["neg_anchor_inds"].clone() for r in fx["rpn"]]
    sampler.neg[0][0] = sampler.pos[0][0]  # a positive anchor replayed as a negative
    with pytest.raises(AssertionError, match="negatives"):
        sampler(labels)
    ref = loss_ref(fx, "loss_cls")
    with pytest.raises(AssertionError, match="loss_cls"):
        assert_rel(step.losses["loss_cls"], ref * (1 + 2 * LOSS_REL), LOSS_REL, "loss_cls")
    with pytest.raises(AssertionError, match="no partner"):
        boxes = step.proposals[0].clone()
        boxes[0, 0] += 2 * PROPOSAL_BOX_ATOL
        candidates_from_mmdet(fx["rcnn"][0]["proposals"], boxes, 0, PROPOSAL_BOX_ATOL)


# ------------------------------------------------------------------------------------------ float64 figures


def measure() -> None:
    """Print the float32 noise (ours32 vs ours64) and the distance to mmdet (ours32 vs mmdet) of every check."""
    torch.set_num_threads(1)
    for path in TRAIN_FILES:
        fx, det = load_case(path)
        s32 = run_step(fx, det)
        s64 = run_step(fx, det, torch.float64, proposals=(s32.proposals, s32.proposal_scores))
        ref64 = run_step(fx, det, torch.float64)  # the float64 RPN's own proposals
        print(f"{path.name}: step {s32.seconds:.1f} s (float32), {s64.seconds:.1f} s (float64)")
        for i, rec in enumerate(fx["rcnn"]):
            g = len(fx["gt_bboxes"][i])
            o32, o64 = s32.candidates[i][g:], ref64.candidates[i][g:]
            boxes32, boxes64 = s32.proposals[i][o32], ref64.proposals[i][o64]
            print(
                f"  proposals image {i}: boxes 32v64 {(boxes32 - boxes64).abs().max():.3g}"
                f" vs mmdet {(s32.proposals[i][o32] - rec['proposals']).abs().max():.3g} px; scores 32v64"
                f" {(s32.proposal_scores[i][o32] - ref64.proposal_scores[i][o64]).abs().max():.3g}"
                f" vs mmdet {(s32.proposal_scores[i][o32] - rec['proposal_scores']).abs().max():.3g}"
            )
        anchors = torch.cat(s32.model.rpn.anchor_generator.grid_anchors(s32.feature_sizes, torch.device("cpu")))
        for i, (rpn, rcnn) in enumerate(zip(fx["rpn"], fx["rcnn"], strict=True)):
            gt = s32.targets[i]["boxes"]
            cands = torch.cat([s32.proposals[i], gt])
            order = s32.candidates[i]
            for what, boxes, ref, sel in (
                ("RPN", anchors, rpn["max_overlaps"], rpn["inside_flags"]),
                ("R-CNN", cands, rcnn["max_overlaps"], order),
            ):
                iou32 = box_iou(gt, boxes).max(dim=0).values[sel]
                iou64 = box_iou(gt.double(), boxes.double()).max(dim=0).values[sel]
                print(
                    f"  max_overlaps {what} image {i}: 32v64 {(iou32 - iou64).abs().max():.3g}"
                    f" vs mmdet {(iou32 - ref).abs().max():.3g}"
                )
        for key in s32.losses:
            a, b, ref = s32.losses[key].double(), s64.losses[key], loss_ref(fx, key).double()
            print(f"  {key}: 32v64 {((a - b) / b).abs().item():.3g} rel, vs mmdet {((a - ref) / ref).abs().item():.3g}")
        for key, a in s32.rpn_level_losses.items():
            b, ref = s64.rpn_level_losses[key], fx["losses"][key]["per_level"].double()
            print(
                f"  {key} per level (of the sum): 32v64 {((a.double() - b) / b.sum()).abs().max().item():.3g},"
                f" vs mmdet {((a.double() - ref) / ref.sum()).abs().max().item():.3g}"
            )
        names = param_names_from_mmdet(list(fx["grad_norm"]))
        worst: dict[str, list[float]] = {}
        for name in fx["grad_norm"]:
            a, b = s32.grads[names[name]].double(), s64.grads[names[name]]
            n64, l1 = b.norm().item(), b.abs().sum().item()
            figures = [
                abs(a.norm().item() - n64) / n64,
                abs(a.norm().item() - fx["grad_norm"][name].item()) / n64,
                abs(a.sum().item() - b.sum().item()) / l1,
                abs(a.sum().item() - fx["grad_sum"][name].item()) / l1,
            ]
            worst[part(name)] = [max(u, v) for u, v in zip(worst.get(part(name), [0.0] * 4), figures, strict=True)]
        for name, (n1, n2, s1, s2) in worst.items():
            print(f"  grad {name}: norm 32v64 {n1:.3g} vs mmdet {n2:.3g}; sum/L1 32v64 {s1:.3g} vs mmdet {s2:.3g}")
        for name, ref in convert_state_dict(fx["grad_full"]).items():
            a, b = s32.grads[name].double(), s64.grads[name]
            scale = b.abs().max().item()
            print(
                f"  grad_full {name}: 32v64 {(a - b).abs().max().item() / scale:.3g}"
                f" vs mmdet {(a - ref.double()).abs().max().item() / scale:.3g}"
            )


if __name__ == "__main__":
    measure()

"""Locating, loading and comparing against the mmdetection oracle fixtures.

The fixtures live in the repository, ``tests/fixtures/mmdet`` (see its README); ``$DH_MMDET_FIXTURES`` may name
another folder of the same format (another seed, width or class count, made with the generator and trim script
in ``tests/fixtures/mmdet/tools``). A missing folder or file is an error, never a skip.

Tolerances are measured as in the fixture README §4: ``rel = max|got − ref| / max|ref|`` over a whole tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.mmdet_import import convert_state_dict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "tests" / "fixtures" / "mmdet"
DETECTOR_FORMAT = "dh-mmdet-detector-trimmed/1"
FLOAT64_UNIT_ROUNDOFF = 2.0**-53


def fixture_dir() -> Path:
    """``$DH_MMDET_FIXTURES`` or ``<repo>/tests/fixtures/mmdet``; a missing folder is an error, not a skip."""
    path = Path(os.environ.get("DH_MMDET_FIXTURES") or DEFAULT_DIR)
    if not path.is_dir():
        raise FileNotFoundError(f"mmdet parity fixtures not found at {path} (DH_MMDET_FIXTURES or {DEFAULT_DIR})")
    return path


def fixture_files(pattern: str) -> list[Path]:
    """Files of the fixture folder matching ``pattern``; none is an error."""
    files = sorted(fixture_dir().glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {fixture_dir()}")
    return files


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_detector(path: Path) -> dict:
    """A trimmed detector fixture (README "Trimmed format"); an untrimmed generator file says how to trim it."""
    fx = load(path)
    found = fx.get("trim", {}).get("format")
    if found != DETECTOR_FORMAT:
        raise ValueError(
            f"{path}: format {found!r}, expected {DETECTOR_FORMAT!r}; trim a generator output with "
            "tests/fixtures/mmdet/tools/trim_detector_fixture.py IN OUT"
        )
    return fx


def num_classes(fx: dict) -> int:
    """Foreground classes of a detector fixture, from its mmdet model config."""
    return int(fx["model_config"]["roi_head"]["bbox_head"]["num_classes"])


def param_names_from_mmdet(names: list[str]) -> dict[str, str]:
    """mmdet parameter names -> ours, by the key mapping of :func:`model.mmdet_import.convert_state_dict`.

    Names only: the converter also permutes ``fc_cls``'s rows to background-first, which a gradient's norm or
    sum does not see (convert whole tensors with ``convert_state_dict`` itself).
    """
    tagged = convert_state_dict({name: torch.tensor([float(i)]) for i, name in enumerate(names)})
    return {names[int(value.item())]: ours for ours, value in tagged.items()}


def rel(got: Tensor, ref: Tensor) -> float:
    """max|got − ref| / max|ref| (the fixture README's tolerance measure)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bg_first(logits: Tensor) -> Tensor:
    """mmdet ``[N, K+1]`` logits (background last) -> ours (background first)."""
    return torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)


def digest_errors(got: Tensor, digest: dict[str, Any]) -> dict[str, float]:
    """How far a recomputed ``[1, C, H, W]`` tensor is from a stored digest (crops + per-channel statistics).

    Returns ``crops_rel`` (max over the three windows of ``|got − ref|``) and ``stats_rel`` (max over channels and
    the three statistics of ``|got − ref|``), both divided by the whole tensor's ``max|ref|`` (the largest
    ``channel_max_abs``), i.e. the README's ``rel``. A statistic of an element-wise difference is bounded by its
    max, so ``stats_rel ≤ rel`` of the whole tensor: one tolerance serves both.
    """
    if tuple(got.shape) != tuple(digest["shape"]):
        raise AssertionError(f"shape {tuple(got.shape)} != fixture {tuple(digest['shape'])}")
    scale = digest["channel_max_abs"].max().clamp_min(1e-30)
    s = digest["crop_size"]
    crops = torch.stack([got[0, :, y : y + s, x : x + s] for y, x in digest["crop_at"]])
    flat = got[0].detach().double().flatten(1)
    stats = {
        "channel_mean": flat.mean(1),
        "channel_abs_mean": flat.abs().mean(1),
        "channel_max_abs": flat.abs().amax(1),
    }
    stats_err = max((stats[k] - digest[k]).abs().max() for k in stats)
    return {
        "crops_rel": ((crops.double() - digest["crops"].double()).abs().max() / scale).item(),
        "stats_rel": (stats_err / scale).item(),
    }


def summation_slack(digest: dict[str, Any]) -> float:
    """Worst-case float64 rounding of a channel mean over ``H·W`` values, relative to ``max|ref|``: ``H·W·2⁻⁵³``.

    The stored statistics were summed by torch in some order; a recomputation may sum in another.
    """
    _, _, h, w = digest["shape"]
    return h * w * FLOAT64_UNIT_ROUNDOFF


def assert_digest_close(got: Tensor, digest: dict[str, Any], rel_tol: float, what: str) -> dict[str, float]:
    """``got`` matches the digest within ``rel_tol`` (crops; statistics also get :func:`summation_slack`).

    ``rel_tol=0`` demands bit-identical crops. Returns the measured errors.
    """
    err = digest_errors(got, digest)
    if err["crops_rel"] > rel_tol or err["stats_rel"] > rel_tol + summation_slack(digest):
        raise AssertionError(f"{what}: {err} exceeds rel {rel_tol:g}")
    return err


def dense_from_topk(values: Tensor, indices: Tensor, shape: tuple[int, ...], fill: float) -> Tensor:
    """The ``[1, A·P, H, W]`` RPN output that holds ``values`` (``[k]`` or ``[k, P]``) at the anchor rows
    ``indices`` (README §1 order: row ``(y·W + x)·A + a``, channel ``P·a + j``) and ``fill`` everywhere else."""
    _, channels, h, w = shape
    per_anchor = 1 if values.dim() == 1 else values.shape[1]
    flat = values.new_full((h * w * channels // per_anchor, per_anchor), fill)
    flat[indices] = values.view(-1, per_anchor)
    return flat.view(h, w, channels).permute(2, 0, 1)[None].contiguous()


def assert_same_boxes(got: Tensor, ref: Tensor, atol: float) -> float:
    """Equal as sets: every box has a partner within ``atol`` px both ways (order may differ on ties).

    Returns the largest partner distance.
    """
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    dist = (got[:, None, :] - ref[None, :, :]).abs().amax(dim=2)
    worst = max(dist.min(dim=0).values.max().item(), dist.min(dim=1).values.max().item())
    assert worst <= atol, f"boxes differ by {worst:.3g} px > {atol:g}"
    return worst


def assert_same_detections(got: dict[str, Tensor], fx: dict, box_atol: float, score_atol: float) -> dict[str, float]:
    """Same (label, box, score) set as mmdet's ``det_*`` (labels: ours 1..K = mmdet 0..K−1); sorted by score.

    Returns the largest box and score differences.
    """
    ref_boxes, ref_scores, ref_labels = fx["det_bboxes"], fx["det_scores"], fx["det_labels"] + 1
    assert got["boxes"].shape == ref_boxes.shape, (tuple(got["boxes"].shape), tuple(ref_boxes.shape))
    dist = (got["boxes"][:, None, :] - ref_boxes[None, :, :]).abs().amax(dim=2)
    dist[got["labels"][:, None] != ref_labels[None, :]] = float("inf")
    partner = dist.argmin(dim=0)
    box_err = dist.min(dim=0).values.max().item()
    assert box_err <= box_atol, f"detection boxes differ by {box_err:.3g} px > {box_atol:g} (or a label differs)"
    assert partner.unique().numel() == ref_boxes.shape[0], "two reference detections share one partner"
    score_err = (got["scores"][partner] - ref_scores).abs().max().item()
    assert score_err <= score_atol, f"detection scores differ by {score_err:.3g} > {score_atol:g}"
    assert torch.all(got["scores"][:-1] >= got["scores"][1:]), "detections not sorted by score"
    return {"boxes": box_err, "scores": score_err}

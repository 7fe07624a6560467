"""Locating and loading the mmdetection oracle fixtures (``../shared/fixtures/mmdet`` by default)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def fixture_dir() -> Path:
    """``$DH_MMDET_FIXTURES`` or ``<repo>/../shared/fixtures/mmdet``; a missing folder is an error, not a skip."""
    path = Path(os.environ.get("DH_MMDET_FIXTURES", REPO.parent / "shared" / "fixtures" / "mmdet"))
    if not path.is_dir():
        raise FileNotFoundError(f"mmdet parity fixtures not found at {path}; set DH_MMDET_FIXTURES")
    return path


def fixture_files(pattern: str) -> list[Path]:
    files = sorted(fixture_dir().glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {fixture_dir()}")
    return files


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref| (the fixture README's tolerance measure)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bg_first(logits: torch.Tensor) -> torch.Tensor:
    """mmdet ``[N, K+1]`` logits (background last) -> ours (background first)."""
    return torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)

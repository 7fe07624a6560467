"""This project's model file: the resolved model config, the state dict and metadata, loaded with
``weights_only=True`` (no pickled modules, no code execution on load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.build import build_model
from model.config import ModelConfig
from model.detector import DoubleHeadRCNN
from model.typed_config import from_mapping

FORMAT = "dhrcnn-model/1"


def save_model(path: str | Path, model: torch.nn.Module, cfg: ModelConfig, meta: dict[str, Any] | None = None) -> None:
    """Write ``{"format", "model_config", "state_dict", "meta"}``; meta must hold plain values only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, "model_config": cfg.to_dict(), "state_dict": state, "meta": meta or {}}, tmp)
    tmp.replace(path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DoubleHeadRCNN, ModelConfig, dict]:
    """``(model in eval mode, config, meta)`` from a file written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (for mmdet checkpoints use `dhrcnn import-mmdet`)")
    cfg = from_mapping(
        ModelConfig,
        {**obj["model_config"], "backbone": {**obj["model_config"]["backbone"], "weights": None}},
        "model",
    )
    model = build_model(cfg)
    model.load_state_dict(obj["state_dict"])
    return model.eval(), cfg, obj.get("meta", {})

"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One ``state.pt`` per checkpoint (rank 0 writes it; loaded with ``weights_only=True``): model, optimizer,
scheduler and scaler states, epoch, iteration, position in the epoch's data, RNG states, counters and the
MLflow run id. Ray Train persists the directory to the run's storage (local or ``s3://``).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Where training stands. ``batch_in_epoch`` counts the batches of ``epoch`` already trained on."""

    epoch: int = 0
    iteration: int = 0
    batch_in_epoch: int = 0
    skipped_nan_steps: int = 0
    consecutive_nan: int = 0
    best_ap: float = -1.0
    last_ap: float = -1.0


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as weights-only-loadable values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(directory: Path, *, model, optimizer, scheduler, scaler, progress: Progress, run_id: str | None) -> Path:
    """Write ``directory/state.pt`` (``model`` is the unwrapped module)."""
    path = Path(directory) / STATE_FILE
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": asdict(progress),
            "rng": rng_state(),
            "mlflow_run_id": run_id,
        },
        path,
    )
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)


def restore(state: dict[str, Any], *, model, optimizer, scheduler, scaler) -> Progress:
    """Load every component of ``state`` in place; returns the progress to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def temp_checkpoint_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dhrcnn-ckpt-")

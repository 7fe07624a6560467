"""A small prepared synthetic dataset for the Ray job tests: ``<root>/parquet/{train,val}`` from
:func:`pipeline.synth.write_synth` through :func:`pipeline.prepare.prepare_coco` (shards of 8 rows)."""

from __future__ import annotations

from pathlib import Path

from pipeline.prepare import PrepareOptions, prepare_coco
from pipeline.synth import SynthConfig, write_synth


def prepared_synth(root: Path, num_images: int, *, seed: int = 3, size: tuple[int, int] = (128, 96)) -> Path:
    """Write ``num_images`` synthetic images (20 % val) under ``root`` and prepare both splits; returns ``root``."""
    write_synth(str(root / "synth"), SynthConfig(num_images=num_images, seed=seed, val_fraction=0.2, size=size))
    for split in ("train", "val"):
        prepare_coco(
            str(root / "synth" / "annotations" / f"instances_{split}.json"),
            str(root / "synth" / "images" / split),
            str(root / "parquet" / split),
            PrepareOptions(rows_per_shard=8),
        )
    return root

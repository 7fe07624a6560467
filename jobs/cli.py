"""The ``dhrcnn`` command line: one subcommand per module under :mod:`jobs.commands`.

Subcommand modules are imported only when their command runs, so ``dhrcnn --help`` stays fast and a
command's heavy dependencies (Ray, MLflow) are loaded only where needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module under jobs.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "import-mmdet": (
        "import_mmdet",
        "convert an mmdetection Double-Head checkpoint into this project's format",
    ),
    "synth": ("synth", "write a synthetic COCO dataset of shapes (train and val splits), locally or to s3://"),
    "prepare": ("prepare", "convert a COCO dataset (one split) into sharded Parquet with a manifest, on Ray Data"),
    "train": ("train", "train a detector with Ray Train (DDP) from a job config, tracked in MLflow"),
    "tune": ("tune", "a Ray Tune sweep (ASHA) over the training job: nested MLflow runs, best model registered"),
    "quickstart": (
        "quickstart",
        "synthetic data -> Parquet -> 2-worker CPU training -> evaluation -> registered model",
    ),
    "evaluate": ("evaluate", "COCO box AP (pycocotools) of a detections file against its annotations"),
    "models": ("models", "the model registry: list versions, promote an alias, pull a ready predictor folder"),
    "predict": ("predict", "batch inference with Ray Data over a folder or s3:// prefix: COCO JSON, Parquet, renders"),
    "submit": ("submit", "run any dhrcnn command as a job on a Ray cluster (Ray Jobs API), following its logs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhrcnn",
        description="Double-Head Faster R-CNN: data preparation, training, evaluation and serving on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"jobs.commands.{module_name}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

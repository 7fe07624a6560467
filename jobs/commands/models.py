"""``dhrcnn models``: the MLflow model registry (see :mod:`jobs.mlflow.registry`).

    dhrcnn models list [NAME]                              versions, aliases, AP, run, creation time
    dhrcnn models promote NAME VERSION --alias staging     point the alias at VERSION (moved from where it was)
    dhrcnn models pull models:/NAME@ALIAS --out DIR        a ready predictor folder
    dhrcnn models register --checkpoint PATH [--name NAME]  log and register a training checkpoint's model

A pulled folder is a complete MLflow model: ``mlflow.pyfunc.load_model(DIR)`` predicts (images of any size in,
boxes in original-image pixels and category names out), ``mlflow models serve -m DIR`` serves it, and
``DIR/artifacts/detector.json`` holds its label map, preprocessing, metrics and training config.
``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///./mlflow.db``) applies to every action.

``register`` does what the end of training does (:func:`jobs.train.register.register_checkpoint`), for a job whose
final registration failed or for any other checkpoint: ``--checkpoint`` is a checkpoint directory or its
``state.pt`` (local or ``s3://``), or the job's run directory (``run.storage_path/run.name``: its most recent
checkpoint); ``--config`` defaults to the run directory's ``config.yaml``, ``--name`` and the tracking URI to the
config's. The model goes into the job's MLflow run; one run registers one version, however often it is run.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="registered versions: name, version, aliases, AP, run id, created")
    listing.add_argument("name", nargs="?", default=None, help="one registered model (default: all)")
    promote = actions.add_parser("promote", help="point an alias at a version")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="version number")
    promote.add_argument("--alias", default="champion", help="alias to set or move (default champion)")
    pull = actions.add_parser("pull", help="download a model into a ready predictor folder")
    pull.add_argument("model", metavar="URI", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    pull.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    register = actions.add_parser("register", help="log and register the model of a training checkpoint")
    register.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a checkpoint dir, its state.pt, or a run dir (local/s3)"
    )
    register.add_argument("--name", default=None, help="registered model name (default: the config's)")
    register.add_argument("--config", default=None, metavar="FILE", help="job config (default: the run's config.yaml)")
    for sub in (listing, promote, pull, register):
        sub.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")


def run(args: argparse.Namespace) -> int:
    from jobs.mlflow.uri import TrackingError

    try:
        return {"list": _list, "promote": _promote, "pull": _pull, "register": _register}[args.action](args)
    except (TrackingError, FileNotFoundError, ValueError) as err:  # RegistryError included: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    from jobs.mlflow.registry import list_models

    rows = list_models(args.name, tracking_uri=args.tracking_uri)
    if not rows:
        print("no registered models")
        return 0
    table = [("name", "version", "aliases", "AP", "run id", "created (UTC)")]
    for r in rows:
        created = datetime.fromtimestamp(r.created_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        ap = f"{r.ap:.4f}" if r.ap is not None else "-"
        table.append((r.name, r.version, ",".join(r.aliases) or "-", ap, r.run_id or "-", created))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _promote(args: argparse.Namespace) -> int:
    from jobs.mlflow.registry import list_models, promote

    before = [r.version for r in list_models(args.name, tracking_uri=args.tracking_uri) if args.alias in r.aliases]
    row = promote(args.name, args.version, args.alias, tracking_uri=args.tracking_uri)
    moved = f"moved from version {before[0]}" if before and before[0] != row.version else "set"
    print(f"{args.name}@{args.alias} -> version {row.version} ({moved}; aliases now: {', '.join(row.aliases)})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from jobs.mlflow.registry import pull

    folder = pull(args.model, Path(args.out), tracking_uri=args.tracking_uri)
    spec = json.loads((folder / "artifacts" / "detector.json").read_text())
    names = ", ".join(str(c["name"]) for c in spec.get("categories", {}).get("categories", []))
    ap = spec.get("metrics", {}).get("val/AP", spec.get("metrics", {}).get("AP"))
    print(f"pulled {args.model} into {folder}")
    print(f"  classes: {names or '?'}; val AP: {ap if ap is not None else '-'}")
    print(f"  label map, preprocessing, metrics, training config: {folder / 'artifacts' / 'detector.json'}")
    print(f"  predict: mlflow.pyfunc.load_model({str(folder)!r}).predict(pd.DataFrame({{'image': [jpeg_bytes]}}))")
    return 0


def _register(args: argparse.Namespace) -> int:
    from jobs.train.register import register_checkpoint

    model_uri, version, run_id = register_checkpoint(
        args.checkpoint, args.name, config=args.config, tracking_uri=args.tracking_uri
    )
    print(f"registered version {version} from {args.checkpoint} (logged model {model_uri}, MLflow run {run_id})")
    return 0

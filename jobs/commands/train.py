"""``dhrcnn train --config FILE [key=value ...] [--dry-run]``: the training job on Ray Train."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job YAML (model, data, train, scaling, tracking, run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 scaling.num_workers=2")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (ignored with RAY_ADDRESS)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from jobs.config import load_job_config

    job = load_job_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(job.to_dict(), sort_keys=False))
        return 0
    from jobs.train import ensure_ray, run_training

    ensure_ray(args.num_cpus)
    result = run_training(job)
    summary = {k: result.metrics[k] for k in ("val/AP", "model_uri", "run_uri") if k in result.metrics}
    print(f"done: {summary} checkpoint {result.checkpoint_path}")
    return 0

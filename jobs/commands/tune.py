"""``dhrcnn tune --config FILE [key=value ...] [--dry-run]``: a Ray Tune sweep over the training job."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job YAML with a tune: section (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. tune.num_samples=8 train.epochs=12 run.name=sweep2"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved job and tune config and exit")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (ignored with RAY_ADDRESS)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from jobs.redact import redact_config
    from jobs.tune.config import load_sweep_config

    sweep = load_sweep_config(args.config, args.overrides)
    if args.dry_run:
        resolved = {**sweep.job.to_dict(), "tune": sweep.tune.to_dict()}
        print(yaml.safe_dump(redact_config(resolved), sort_keys=False))  # no tracking URI credentials
        return 0
    from jobs.ray_env import ensure_ray
    from jobs.tune.results import results_table
    from jobs.tune.sweep import run_sweep

    ensure_ray(args.num_cpus)
    result = run_sweep(sweep)
    print(results_table(result.rows, list(sweep.tune.space), sweep.tune.metric))
    if result.interrupted:
        print(f"sweep interrupted: run the same command again to resume it ({result.path})")
        return 130
    if result.best is None:
        print("no trial completed: nothing to register")
        return 1
    print(f"best trial {result.best.trial_id}: {sweep.tune.metric} {result.best.value}")
    print(f"best model: {result.model_uri}")
    print(f"sweep run:  MLflow run {result.parent_run_id} (trials nested under it)")
    return 0

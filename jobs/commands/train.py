"""``dhrcnn train --config FILE [key=value ...] [--dry-run] [--verbose]``: the training job on Ray Train.

Prints the training and evaluation progress bars and the results (box AP table, MLflow run, model, checkpoint);
Ray's own output (worker logs, Ray Data's progress bars) stays in the Ray session's log files unless
``--verbose``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job YAML (model, data, train, scaling, tracking, run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 scaling.num_workers=2")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (ignored with RAY_ADDRESS)")
    parser.add_argument("--verbose", action="store_true", help="also print Ray's logs and Ray Data's progress bars")


def run(args: argparse.Namespace) -> int:
    import yaml

    from jobs.config import load_job_config
    from jobs.redact import redact_config

    job = load_job_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(redact_config(job.to_dict()), sort_keys=False))  # no tracking URI credentials
        return 0
    from jobs.console import ray_console, results_text
    from jobs.ray_env import ensure_ray
    from jobs.train.job import run_training

    console = ray_console(args.verbose)
    ensure_ray(args.num_cpus, console=console)
    result = run_training(job, console=console)
    ap = result.metrics.get("val/AP")
    print(results_text(result.metrics, title=f"box AP ({job.run.name}): {ap:.3f}" if ap is not None else ""))
    print(f"checkpoint:   {result.checkpoint_path}")
    return 0

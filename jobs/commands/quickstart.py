"""``dhrcnn quickstart [--workdir DIR] [--s3] [--verbose] [key=value ...]``: the whole path on embedded defaults,
nothing to set up; ``key=value`` changes the embedded job (``train.epochs=2``) or dataset (``synth.num_images=60``).

Prints a progress bar per phase (data, training, each evaluation), then the box AP table, the MLflow run, the
registered model and the picture of predictions; ``--verbose`` adds Ray's own output (worker logs, Ray Data's
per-operator progress bars), which otherwise stays in the Ray session's log files."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="dhrcnn_quickstart", help="where data, runs and pictures go")
    parser.add_argument("--s3", action="store_true", help="go through a local S3 server (moto) instead of files")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the cwd)")
    parser.add_argument("--verbose", action="store_true", help="also print Ray's logs and Ray Data's progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="change the embedded job (e.g. train.epochs=2) or dataset (e.g. synth.num_images=60)",
    )


def run(args: argparse.Namespace) -> int:
    from jobs.console import ray_console, results_text
    from jobs.quickstart import run_quickstart
    from pipeline.storage import StorageConfig

    console = ray_console(args.verbose)
    storage = StorageConfig()
    workdir = args.workdir
    server = None
    if args.s3:
        from jobs.local_s3 import export_env, start_s3_server

        server = start_s3_server()
        export_env(server)  # before Ray starts: its workers inherit the environment
        workdir = f"{server.create_bucket('dhrcnn-quickstart')}/{args.workdir}"
        storage = server.storage_config
    try:
        result = run_quickstart(workdir, storage, args.tracking_uri, args.overrides, console=console)
    finally:
        if server is not None:
            server.stop()
    print(results_text(result.metrics, title=f"box AP (synthetic val): {result.ap:.3f}"))
    print(f"predictions:  {result.picture}")
    return 0

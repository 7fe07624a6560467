"""``dhrcnn submit [--address URL] [--no-wait] … -- COMMAND [ARGS]``: any dhrcnn command as a Ray job.

    dhrcnn submit --address http://127.0.0.1:8265 -- train --config configs/dh_r50_fpn_1x_coco.yaml
    dhrcnn submit --no-wait -- quickstart --workdir /shared/qs train.epochs=2

The project is uploaded as the job's working directory; the S3/MLflow settings of this shell go with it,
credentials only with ``--forward-credentials`` (see :mod:`jobs.cluster.submit_env`); a token is sent when the cluster
asks for one (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, see
:mod:`jobs.cluster.dashboard_auth`). Exit status: 0 when the job succeeded (or was submitted, with ``--no-wait``),
1 when it failed or was stopped, 2 when nothing was submitted, 130 when detached by Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the head's dashboard (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, http://127.0.0.1:8265)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    parser.add_argument(
        "--stop-on-interrupt", action="store_true", help="Ctrl-C stops the job (default: detach, job keeps running)"
    )
    parser.add_argument(
        "--forward-credentials",
        action="store_true",
        help="also forward AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN and MLFLOW_TRACKING_USERNAME/"
        "PASSWORD/TOKEN through the runtime environment (default: the cluster has its own: IAM role, Secret)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="send the cluster's token over plain HTTP to a remote host (refused otherwise: use https or a tunnel)",
    )
    parser.add_argument(
        "--no-forward-settings",
        action="store_true",
        help="do not forward AWS_ENDPOINT_URL, AWS_REGION, MLFLOW_TRACKING_URI, …: keep the cluster's",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the dhrcnn command to run as a job, after --",
    )


def quiet_ray_client_logs() -> None:
    """Keep Ray's client-side INFO lines (packaging, upload, websocket) out of the output; warnings stay. The
    working-dir module only warns that .git is excluded by default, which the excludes do anyway."""
    import ray.job_submission  # noqa: F401  (importing it sets these loggers to INFO: set the levels after)

    for name in (
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
        "ray._private.runtime_env.packaging",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    from jobs.cluster.dashboard_auth import DashboardError, resolve_address
    from jobs.cluster.submit import EXIT_NOT_SUBMITTED, SubmitError, SubmitOptions, job_command, submit

    quiet_ray_client_logs()
    try:
        options = SubmitOptions(
            address=resolve_address(args.address, os.environ),
            command=job_command(args.command),
            wait=not args.no_wait,
            stop_on_interrupt=args.stop_on_interrupt,
            forward_settings=not args.no_forward_settings,
            forward_credentials=args.forward_credentials,
            insecure=args.insecure,
        )
        return submit(options, os.environ, sys.stdout, sys.stderr).exit_code
    except (SubmitError, DashboardError) as exc:
        print(f"dhrcnn submit: error: {exc}", file=sys.stderr)
        return EXIT_NOT_SUBMITTED

"""``dhrcnn submit``: run any ``dhrcnn`` command as a job on a Ray cluster through the Ray Jobs API.

The job's command line is ``python -m jobs.cli <command> <args>``, run in the uploaded project (the job's
working directory, on its PYTHONPATH), so the cluster runs the code of this checkout; inside the job
``RAY_ADDRESS`` is set by Ray and the command joins the cluster. Its runtime environment is
:class:`jobs.cluster.submit_env.JobEnvironment` (settings forwarded, credentials only on request). The command line is
refused if it holds a secret (:func:`jobs.cluster.submit_env.secrets_in_args`): secrets travel in the environment.

The dashboard is asked first whether it needs a token (:mod:`jobs.cluster.dashboard_auth`), which also makes an
unreachable address fail within seconds. Then the job is submitted and, unless ``wait`` is off, its logs are
followed to ``stdout`` until it ends; everything else is written to ``stderr``. Ctrl-C while following detaches
(the job keeps running, and the ``ray job`` commands to follow or stop it are printed) or, with
``stop_on_interrupt``, stops the job.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit

from jobs.cluster.dashboard_auth import AuthToken, DashboardError, probe_dashboard, required_token
from jobs.cluster.submit_env import (
    UPLOAD_LIMIT_BYTES,
    JobEnvironment,
    build_job_environment,
    environment_notes,
    measure_working_dir,
    secrets_in_args,
)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # jobs/cluster/submit.py -> the checkout
# The job's interpreter: the cluster's `python` (the one with Ray and this project's dependencies).
JOB_PYTHON = "python"
FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_JOB_FAILED = 1
EXIT_NOT_SUBMITTED = 2
EXIT_INTERRUPTED = 130


class SubmitError(RuntimeError):
    """The job could not be submitted (nothing ran); the message says why and what to do."""


@dataclass(frozen=True)
class SubmitOptions:
    """One ``dhrcnn submit``.

    Args:
        address: the dashboard URL (``http://HEAD:8265``), already resolved.
        command: the dhrcnn command and its arguments (``["train", "--config", "c.yaml"]``).
        wait: follow the logs and wait for the end; ``False``: print the submission id and return.
        stop_on_interrupt: Ctrl-C while following stops the job instead of detaching.
        forward_settings: forward the S3/MLflow settings of the submitting environment.
        forward_credentials: forward its credentials too (through the runtime environment only).
        insecure: send the cluster's token over plain HTTP to a remote host (refused otherwise).
    """

    address: str
    command: tuple[str, ...]
    wait: bool = True
    stop_on_interrupt: bool = False
    forward_settings: bool = True
    forward_credentials: bool = False
    insecure: bool = False


@dataclass(frozen=True)
class SubmitResult:
    """How a ``dhrcnn submit`` ended: ``status`` is ``None`` when it did not wait for the end."""

    submission_id: str
    status: str | None
    exit_code: int


def job_command(args: Sequence[str]) -> tuple[str, ...]:
    """The dhrcnn command after ``--``: a leading ``--`` and ``dhrcnn`` are dropped; it must name a command.

    Raises:
        SubmitError: no command, an unknown one, or ``submit`` itself.
    """
    from jobs.cli import COMMANDS

    words = list(args)
    if words[:1] == ["--"]:
        words = words[1:]
    if words[:1] == ["dhrcnn"]:
        words = words[1:]
    if not words:
        raise SubmitError(
            "nothing to submit: put the dhrcnn command after --, e.g. `dhrcnn submit -- train --config …`"
        )
    if words[0] == "submit" or words[0] not in COMMANDS:
        known = ", ".join(name for name in COMMANDS if name != "submit")
        raise SubmitError(f"{words[0]!r} is not a dhrcnn command that can be submitted; one of: {known}")
    return tuple(words)


def entrypoint(command: Sequence[str]) -> str:
    """The job's shell command line for the dhrcnn ``command``."""
    return shlex.join([JOB_PYTHON, "-m", "jobs.cli", *command])


def submit(options: SubmitOptions, environ: Mapping[str, str], out: TextIO, err: TextIO) -> SubmitResult:
    """Submit ``options.command`` and, if ``options.wait``, follow it to its end (logs to ``out``).

    Raises:
        SubmitError: the command line holds a secret, the project cannot be uploaded, or the cluster cannot
            be reached or refuses the request (nothing was submitted).
    """
    leaked = secrets_in_args(options.command, environ)
    if leaked:
        raise SubmitError(
            f"the command line holds {', '.join(leaked)}: a job's command line is stored and shown by the "
            "cluster. Pass secrets through the environment (see --forward-credentials), not as arguments."
        )
    try:
        env = build_job_environment(
            PROJECT_ROOT,
            environ,
            forward_settings=options.forward_settings,
            forward_credentials=options.forward_credentials,
        )
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
    client, token = connect(options.address, environ, insecure=options.insecure)
    _print_plan(options, env, token, err)
    submission_id = f"dhrcnn-{options.command[0]}-{uuid.uuid4().hex[:8]}"
    try:
        client.submit_job(
            entrypoint=entrypoint(options.command), submission_id=submission_id, runtime_env=env.runtime_env()
        )
    except Exception as exc:
        raise SubmitError(_submit_failure(options.address, exc, token)) from None
    print(f"submitted job {submission_id} to {options.address}", file=err)
    if not options.wait:
        print(submission_id, file=out)
        print(_how_to_follow(options.address, submission_id, token), file=err)
        return SubmitResult(submission_id, None, 0)
    return follow(client, options, submission_id, token, out, err)


def connect(
    address: str, environ: Mapping[str, str], *, insecure: bool = False
) -> tuple[JobSubmissionClient, AuthToken | None]:
    """A Jobs API client for the dashboard at ``address``, with the token when the cluster asks for one.

    Raises:
        SubmitError: unreachable, not a dashboard, no token, a token the cluster refuses, or a token that would
            travel in clear (plain HTTP to a host other than this machine) without ``insecure``.
    """
    from ray.job_submission import JobSubmissionClient

    try:
        wants_token = probe_dashboard(address)  # a public endpoint: no token sent
        if wants_token and _in_clear(address) and not insecure:
            raise SubmitError(
                f"the Ray cluster at {address} asks for a token, and plain HTTP to a remote host would send it in "
                "clear: use its https:// address, or a tunnel (`kubectl port-forward svc/dhrcnn-head-svc "
                "8265:8265`, `ray dashboard CLUSTER.yaml`) and http://127.0.0.1:8265, or pass --insecure to send "
                "it anyway."
            )
        token = required_token(address, environ, Path.home()) if wants_token else None
    except DashboardError as exc:
        raise SubmitError(str(exc)) from None
    headers = token.header() if token is not None else None
    try:
        # JobSubmissionClient prefers RAY_ADDRESS / RAY_API_SERVER_ADDRESS over its argument: the address
        # probed above is the one used.
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            client = JobSubmissionClient(address, headers=headers)
    except Exception as exc:
        raise SubmitError(_submit_failure(address, exc, token)) from None
    return client, token


def follow(
    client: JobSubmissionClient,
    options: SubmitOptions,
    submission_id: str,
    token: AuthToken | None,
    out: TextIO,
    err: TextIO,
) -> SubmitResult:
    """Stream the job's logs to ``out`` until it ends, then report its status (Ctrl-C: detach, or stop)."""
    started = time.monotonic()
    try:
        status = _tail_until_final(client, submission_id, out, err)
    except KeyboardInterrupt:
        if not options.stop_on_interrupt:
            print(f"\ndetached: job {submission_id} keeps running.", file=err)
            print(_how_to_follow(options.address, submission_id, token), file=err)
            return SubmitResult(submission_id, None, EXIT_INTERRUPTED)
        print(f"\nstopping job {submission_id} …", file=err)
        client.stop_job(submission_id)
        # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S; on a loaded head the status can take
        # minutes to follow
        status = _wait_final(client, submission_id, timeout_s=300.0)
    info = client.get_job_info(submission_id)
    elapsed = time.monotonic() - started
    detail = f": {_first_line(info.message)}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {submission_id} {status} after {elapsed:.0f} s{detail}", file=err)
    return SubmitResult(submission_id, status, 0 if status == "SUCCEEDED" else EXIT_JOB_FAILED)


def _tail_until_final(client: JobSubmissionClient, submission_id: str, out: TextIO, err: TextIO) -> str:
    """Follow the logs to ``out`` until the stream ends; if it ends while the job still runs (a dropped
    connection), keep polling the status rather than replaying the logs."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    status = _wait_final(client, submission_id, timeout_s=30.0)
    if status not in FINAL_STATES:
        print(f"the log stream ended while the job is {status}: waiting for its end", file=err)
        status = _wait_final(client, submission_id, timeout_s=None)
    return status


def _wait_final(client: JobSubmissionClient, submission_id: str, timeout_s: float | None) -> str:
    """Poll the status until it is final or ``timeout_s`` passes; returns the last status seen."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in FINAL_STATES or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(1.0)


def _print_plan(options: SubmitOptions, env: JobEnvironment, token: AuthToken | None, err: TextIO) -> None:
    size = measure_working_dir(Path(env.working_dir), env.excludes)
    auth = f"token from {token.source}" if token is not None else "no token (the cluster asks for none)"
    print(f"cluster:      {options.address} ({auth})", file=err)
    print(f"command:      dhrcnn {shlex.join(options.command)}", file=err)
    print(f"working dir:  {env.working_dir} ({size.summary()}, before .gitignore/.rayignore)", file=err)
    print(f"environment:  {', '.join(env.describe()) or '(nothing forwarded)'}", file=err)
    if token is not None and _in_clear(options.address):
        print(
            "warning: --insecure: the token travels in clear over plain HTTP to a remote host: prefer https, or a "
            "tunnel (`kubectl port-forward`, `ray dashboard`) and http://127.0.0.1.",
            file=err,
        )
    if size.total_bytes > UPLOAD_LIMIT_BYTES:
        biggest = ", ".join(f"{name} {nbytes / 1024**2:.0f} MiB" for name, nbytes in size.largest)
        print(
            f"warning: the working directory is {size.total_bytes / 1024**2:.0f} MiB ({biggest}); the dashboard "
            f"accepts {UPLOAD_LIMIT_BYTES // 1024**2} MiB zipped. List big folders in .rayignore (data belongs "
            "in S3).",
            file=err,
        )
    for note in environment_notes(env):
        print(f"note: {note}", file=err)


def _first_line(message: str) -> str:
    """Ray's message for a failed entrypoint, without the end of the logs it repeats (already shown)."""
    return message.splitlines()[0].split(", last available logs")[0] if message.strip() else message


def _in_clear(address: str) -> bool:
    """Whether a request to ``address`` crosses the network unencrypted: plain HTTP to a non-loopback host."""
    return address.startswith("http://") and not _is_loopback(address)


def _is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _how_to_follow(address: str, submission_id: str, token: AuthToken | None) -> str:
    prefix = "RAY_AUTH_MODE=token " if token is not None else ""
    lines = [
        f"  follow: {prefix}ray job logs --address {address} --follow {submission_id}",
        f"  status: {prefix}ray job status --address {address} {submission_id}",
        f"  stop:   {prefix}ray job stop --address {address} {submission_id}",
    ]
    if token is not None:
        lines.append(
            f"  (the ray CLI sends the token only with RAY_AUTH_MODE=token; this one came from {token.source})"
        )
    return "\n".join(lines)


def _submit_failure(address: str, exc: Exception, token: AuthToken | None) -> str:
    """A message for a failed request to the Jobs API that never includes the token."""
    from ray.exceptions import AuthenticationError

    text = str(exc)
    if token is not None and token.value in text:
        text = text.replace(token.value, "***")
    if isinstance(exc, AuthenticationError):
        if token is None:
            return f"the Ray cluster at {address} asks for a token: {text}"
        return (
            f"the Ray cluster at {address} refused the token from {token.source}: it is not this cluster's "
            "token (check RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token, in that order)."
        )
    if "413" in text:
        return (
            f"the working directory upload is larger than the dashboard at {address} accepts "
            f"({UPLOAD_LIMIT_BYTES // 1024**2} MiB zipped): list big folders in .rayignore. [{text}]"
        )
    if isinstance(exc, ConnectionError):
        return f"lost the connection to the Ray dashboard at {address}: {text}"
    return f"the Ray Jobs API at {address} failed: {type(exc).__name__}: {text}"


@contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """Unset ``names`` in ``os.environ`` for the duration (restored afterwards)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)

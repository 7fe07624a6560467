"""``dhrcnn submit``: the job's environment, command line and upload (offline), then against a real local Ray head.

The head is started by this module (``ray start --head --block`` in its own process group, every port chosen
free, its own ``--temp-dir``), with token authentication on and a token of its own (``RAY_AUTH_TOKEN``), so
that the machine's ``~/.ray/auth_token`` and other Ray instances play no part. It is stopped by signalling that
process group only. ``dhrcnn submit`` runs as a subprocess, as a user would run it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from jobs.cluster.dashboard_auth import DashboardError, load_token, normalize_address, resolve_address
from jobs.cluster.submit import SubmitError, SubmitOptions, entrypoint, job_command, submit
from jobs.cluster.submit_env import (
    WORKING_DIR_EXCLUDES,
    build_job_environment,
    environment_notes,
    measure_working_dir,
    secrets_in_args,
)
from jobs.redact import redact_url
from tests.conftest import RAY_TEST_ENV

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Value-That-Must-Not-Leak"
CLEAN_ENV_PREFIXES = ("AWS_", "MLFLOW_", "RAY_")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without AWS/MLflow/Ray settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV_PREFIXES)}
    env["PYTHONPATH"] = str(ROOT)
    env.update(RAY_TEST_ENV)
    env.update(extra)
    return env


def _dhrcnn_submit(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------------------------------------- offline


def test_job_command_and_entrypoint() -> None:
    assert job_command(["--", "dhrcnn", "train", "--config", "c.yaml"]) == ("train", "--config", "c.yaml")
    assert job_command(["quickstart", "train.epochs=1"]) == ("quickstart", "train.epochs=1")
    for bad in ([], ["--"], ["nope"], ["submit", "--", "train"]):
        with pytest.raises(SubmitError):
            job_command(bad)
    assert entrypoint(("train", "--config", "my job.yaml")) == "python -m jobs.cli train --config 'my job.yaml'"


def test_address_resolution() -> None:
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert resolve_address("head:9000", {"RAY_ADDRESS": "http://other:8265"}) == "http://head:9000"
    both = {"RAY_ADDRESS": "http://other:8265", "RAY_API_SERVER_ADDRESS": "https://jobs.example.com"}
    assert resolve_address(None, both) == "https://jobs.example.com"  # Ray's job CLI order
    for bad in ("ray://head:10001", "auto"):
        with pytest.raises(DashboardError, match="not a Ray dashboard address"):
            normalize_address(bad)


def test_settings_forwarded_credentials_only_on_request() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_REGION": "eu-west-1",
        "MLFLOW_TRACKING_URI": "https://alice:pa55word@mlflow.example.com/",
        "MLFLOW_EXPERIMENT_NAME": "dh",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "MLFLOW_TRACKING_PASSWORD": SECRET,
        "RAY_AUTH_TOKEN": SECRET,
        "HOME": "/root",
    }
    env = build_job_environment(ROOT, environ)
    assert set(env.env_vars) == {"AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"}
    with_creds = build_job_environment(ROOT, environ, forward_credentials=True)
    assert with_creds.env_vars["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert with_creds.env_vars["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert "RAY_AUTH_TOKEN" not in with_creds.env_vars  # never: the job uses the cluster's
    assert build_job_environment(ROOT, environ, forward_settings=False).env_vars == {}
    runtime_env = with_creds.runtime_env()
    assert runtime_env["working_dir"] == str(ROOT) and ".git" in runtime_env["excludes"]

    printed = " ".join(with_creds.describe() + environment_notes(with_creds))
    assert SECRET not in printed and "pa55word" not in printed
    assert "MLFLOW_TRACKING_URI=https://alice:***@mlflow.example.com/" in printed
    assert "AWS_SECRET_ACCESS_KEY=***" in printed
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_environment_notes() -> None:
    local = build_job_environment(ROOT, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    notes = environment_notes(local)
    assert any("AWS_ENDPOINT_URL points at this machine" in n for n in notes)
    assert any("MLFLOW_TRACKING_URI is not forwarded" in n for n in notes)
    relative = build_job_environment(ROOT, {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert any("is relative" in n for n in environment_notes(relative))
    absolute = build_job_environment(ROOT, {"MLFLOW_TRACKING_URI": "sqlite:////srv/mlflow.db"})
    assert environment_notes(absolute) == []


def test_secrets_never_in_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"AWS_SECRET_ACCESS_KEY": SECRET}
    assert secrets_in_args(["train", f"data.storage.secret_key={SECRET}"], environ) == [
        "AWS_SECRET_ACCESS_KEY",
        "the secret override data.storage.secret_key=…",
    ]
    # a secret-named override is refused whatever its value (the stored entrypoint would keep it)
    assert secrets_in_args(["train", "data.storage.secret_access_key=abc", "train.epochs=2"], {}) == [
        "the secret override data.storage.secret_access_key=…"
    ]
    assert secrets_in_args(["train", "tracking.tracking_uri=http://mlflow:5000", "run.name=a"], {}) == []
    assert secrets_in_args(["models", "list", "--tracking-uri", "http://u:p@mlflow:5000"], {}) == [
        "a URL with a password or a secret query value"
    ]
    assert secrets_in_args(["evaluate", "--tracking-uri", "https://mlflow/?token=abcd"], {}) == [
        "a URL with a password or a secret query value"
    ]
    assert secrets_in_args(["train", "--config", "c.yaml"], environ) == []
    # Refused before anything is contacted (the address is not even resolved).
    options = SubmitOptions(address="http://127.0.0.1:9", command=("train", f"x={SECRET}"))
    with pytest.raises(SubmitError, match="AWS_SECRET_ACCESS_KEY") as info:
        submit(options, environ, sys.stdout, sys.stderr)
    assert SECRET not in str(info.value) and SECRET not in "".join(capsys.readouterr())


def test_token_lookup_follows_ray(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert load_token({}, home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    token = load_token({}, home)
    assert token is not None and token.value == "from-home" and token.source.endswith(".ray/auth_token")
    path_file = tmp_path / "tok"
    path_file.write_text("from-path")
    token = load_token({"RAY_AUTH_TOKEN_PATH": str(path_file)}, home)
    assert token is not None and token.value == "from-path"
    token = load_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}, home)
    assert token is not None and token.value == "from-env" and token.source == "RAY_AUTH_TOKEN"
    assert "from-env" not in repr(token)
    with pytest.raises(DashboardError, match="RAY_AUTH_TOKEN_PATH"):
        load_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def _uploaded_names(root: Path) -> list[str]:
    """The files Ray itself packages for ``working_dir=root`` with the submit excludes (the real upload)."""
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pkg.zip"
        create_package(str(root), package, include_gitignore=True, excludes=list(WORKING_DIR_EXCLUDES))
        with zipfile.ZipFile(package) as zf:
            return [n for n in zf.namelist() if not n.endswith("/")]


def test_upload_leaves_out_big_folders(tmp_path: Path) -> None:
    project = tmp_path / "project"
    for rel in (
        "pyproject.toml",
        "jobs/cli.py",
        "jobs/runs.py",  # a module named like an excluded folder: kept (that pattern is root-only)
        "pipeline/data/schema.py",  # likewise
        ".git/objects/ab/cdef",
        ".venv/lib/torch.so",
        "venv/bin/python",
        "jobs/__pycache__/cli.cpython-311.pyc",
        "runs/quickstart/checkpoint_0/model.pt",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "dhrcnn_quickstart/parquet/train/part-0.parquet",
        "data/coco/train2017/0001.jpg",
        "resnet50-0676ba61.pth",
        ".env",  # credentials never travel with the code
        "configs/.env.prod",
        "certs/server.pem",
        "certs/server.key",
        ".aws/credentials",
        "deploy/gcp-credentials.json",
        "infra/k8s/secret.yaml",
        ".netrc",
    ):
        path = project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    expected = ["jobs/cli.py", "jobs/runs.py", "pipeline/data/schema.py", "pyproject.toml"]
    assert sorted(_uploaded_names(project)) == expected
    size = measure_working_dir(project, WORKING_DIR_EXCLUDES)  # the estimate printed before uploading
    assert size.files == len(expected) and size.total_bytes == 1000 * len(expected)


def test_upload_of_this_repository_is_small() -> None:
    names = _uploaded_names(ROOT)
    banned = (".git/", ".venv/", "venv/", "__pycache__/", "mlruns/", "runs/", "dhrcnn_quickstart/")
    assert not [n for n in names if n.startswith(banned) or "/__pycache__/" in n or n.endswith((".db", ".pt"))]
    assert "jobs/cli.py" in names and "model/__init__.py" in names and "pyproject.toml" in names
    size = measure_working_dir(ROOT, WORKING_DIR_EXCLUDES)
    assert size.total_bytes < 20 * 1024**2, size.largest


class _TokenDashboard:
    """A stand-in dashboard that asks for a token and records the Authorization headers it receives."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen = self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization"))
                body = b'{"authentication_mode": "token"}'
                self.send_response(200 if self.path == "/api/authentication_mode" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]


@pytest.mark.timeout(60)
def test_token_is_not_sent_in_clear_to_a_remote_host_without_insecure() -> None:
    dashboard = _TokenDashboard()
    try:
        remote = f"http://{socket.gethostname()}:{dashboard.port}"  # not a loopback name: treated as remote
        environ = {"RAY_AUTH_TOKEN": SECRET}
        options = SubmitOptions(address=remote, command=("train", "--config", "c.yaml"), wait=False)
        with pytest.raises(SubmitError, match=r"would send it in clear.*--insecure"):
            submit(options, environ, sys.stdout, sys.stderr)
        assert dashboard.authorizations == [None], "only the public probe, without the token"
        local = SubmitOptions(address=f"http://127.0.0.1:{dashboard.port}", command=options.command, wait=False)
        insecure = SubmitOptions(address=remote, command=options.command, wait=False, insecure=True)
        for allowed in (local, insecure):  # the token goes out (the stand-in then fails the submission)
            with pytest.raises(SubmitError):
                submit(allowed, environ, sys.stdout, sys.stderr)
        assert f"Bearer {SECRET}" in dashboard.authorizations
    finally:
        dashboard.server.shutdown()


@pytest.mark.timeout(60)
def test_unreachable_address_fails_fast() -> None:
    (port,) = _free_ports(1)  # closed: nothing listens on it
    address = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    result = _dhrcnn_submit("--address", address, "--", "train", "--config", "c.yaml", env=_clean_env(), timeout=50)
    assert time.monotonic() - started < 20  # interpreter start + import; the probe itself fails in < 1 s
    assert result.returncode == 2, result.stderr
    assert f"cannot reach the Ray dashboard at {address}" in result.stderr
    assert "ray start --head" in result.stderr and "port-forward" in result.stderr


# ---------------------------------------------------------------------------------------------- real head


@dataclass(frozen=True)
class Head:
    address: str
    token: str
    temp_dir: Path

    def client(self) -> JobSubmissionClient:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def env(self, **extra: str) -> dict[str, str]:
        """A submitting environment holding this head's token."""
        return _clean_env(RAY_AUTH_TOKEN=self.token, **extra)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="rsub", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(16)
    ports = _free_ports(9)
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={ports[0]}",
        f"--dashboard-port={ports[1]}",
        f"--ray-client-server-port={ports[2]}",
        f"--dashboard-agent-listen-port={ports[3]}",
        f"--dashboard-agent-grpc-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--metrics-export-port={ports[6]}",
        f"--node-manager-port={ports[7]}",
        f"--object-manager-port={ports[8]}",
        "--num-cpus=4",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--block",
    ]
    log = (temp_dir / "ray_start.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        _wait_for_dashboard(process, address, token, temp_dir)
        yield Head(address, token, temp_dir)
    finally:
        _stop_group(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(process: subprocess.Popen, address: str, token: str, temp_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}: {(temp_dir / 'ray_start.log').read_text()}")
        try:
            r = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"the dashboard at {address} did not come up in 120 s")


def _stop_group(process: subprocess.Popen) -> None:
    """Stop our `ray start --block`: SIGTERM its process group (it then stops the node's processes), SIGKILL
    after a minute; Ray's workers run in process groups of their own, so the descendants seen just before are
    then killed one by one, by pid (and start time, against pid reuse), if still there."""
    descendants = _descendants(process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # start_new_session: the group's id is the leader's pid
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=60)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_start_time(pid) == start for pid, start in descendants.items()):
        time.sleep(0.5)  # workers exit by themselves once their raylet is gone
    for pid, start in descendants.items():
        if _start_time(pid) == start:
            os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), ``None`` for a process that is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``root`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        start = _start_time(pid)
        if start is not None and pid not in found:
            found[pid] = start
            stack.extend(children.get(pid, []))
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_token_missing_or_wrong(head: Head, tmp_path: Path) -> None:
    args = ("--address", head.address, "--", "train", "--config", "c.yaml")
    missing = _dhrcnn_submit(*args, env=_clean_env(HOME=str(tmp_path)), timeout=60)
    assert missing.returncode == 2
    assert f"the Ray cluster at {head.address} requires token authentication" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr

    wrong_token = "wrong-" + secrets.token_hex(8)
    wrong = _dhrcnn_submit(*args, env=_clean_env(RAY_AUTH_TOKEN=wrong_token, HOME=str(tmp_path)), timeout=60)
    assert wrong.returncode == 2
    assert "refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    for output in (missing.stdout, missing.stderr, wrong.stdout, wrong.stderr):
        assert wrong_token not in output and head.token not in output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failing_job_exits_non_zero(head: Head) -> None:
    result = _dhrcnn_submit(
        "--address",
        head.address,
        "--",
        "dhrcnn",
        "train",
        "--config",
        "/nonexistent/job.yaml",
        env=head.env(),
        timeout=240,
    )
    assert result.returncode == 1, result.stderr
    assert "FAILED after" in result.stderr and "failed with exit code 1" in result.stderr
    assert "last available logs" not in result.stderr  # the logs went to stdout once, not repeated
    assert "/nonexistent/job.yaml" in result.stdout  # the job's own error, from its logs
    assert head.token not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_wait_forwards_credentials_through_the_environment_only(head: Head) -> None:
    env = head.env(AWS_SECRET_ACCESS_KEY=SECRET, AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_REGION="eu-west-1")
    args = ("--address", head.address, "--no-wait", "--forward-credentials", "--", "train")
    result = _dhrcnn_submit(*args, "--config", "configs/dh_r50_fpn_1x_coco.yaml", "--dry-run", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    submission_id = result.stdout.strip()
    assert submission_id.startswith("dhrcnn-train-")
    assert f"ray job logs --address {head.address} --follow {submission_id}" in result.stderr
    assert f"ray job stop --address {head.address} {submission_id}" in result.stderr
    assert SECRET not in result.stdout + result.stderr and head.token not in result.stdout + result.stderr

    client = head.client()
    deadline = time.monotonic() + 180
    while str(client.get_job_status(submission_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the --no-wait job did not finish"
        time.sleep(1)
    info = client.get_job_info(submission_id)
    assert str(info.status.value) == "SUCCEEDED", client.get_job_logs(submission_id)
    assert info.entrypoint == "python -m jobs.cli train --config configs/dh_r50_fpn_1x_coco.yaml --dry-run"
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == SECRET and env_vars["AWS_REGION"] == "eu-west-1"
    assert "RAY_AUTH_TOKEN" not in env_vars
    assert "num_classes" in client.get_job_logs(submission_id)  # the dry run printed the resolved config


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_interrupt_with_stop_on_interrupt_stops_the_job(head: Head, tmp_path: Path) -> None:
    """A job that runs for hours (a synthetic dataset of a million images, one process: no load on the
    cluster beside it) is stopped by Ctrl-C. The waits are on conditions with generous bounds: the job's
    command starting, then the client's exit (it polls the job until STOPPED)."""
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "jobs.cli", "submit", "--address", head.address, "--stop-on-interrupt", "--"),
            *("synth", "--out", str(tmp_path / "synth"), "--images", "1000000"),
        ],
        cwd=ROOT,
        env=head.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the job's logs: wait until its command runs
            if "Running entrypoint" in line:
                break
        deadline = time.monotonic() + 600  # ... and has written its first images (imports: minutes under load)
        while not list((tmp_path / "synth").rglob("*.png")) and not list((tmp_path / "synth").rglob("*.jpg")):
            assert time.monotonic() < deadline and process.poll() is None, "the job never started writing"
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, err
    (submission_id,) = re.findall(r"stopping job (dhrcnn-synth-\S+) …", err)
    assert f"job {submission_id} STOPPED" in err
    assert str(head.client().get_job_status(submission_id).value) == "STOPPED"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_as_a_job(head: Head, tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.monotonic()
    result = _dhrcnn_submit(
        "--address",
        head.address,
        "--",
        "quickstart",
        "--workdir",
        str(tmp_path / "qs"),
        "train.epochs=1",
        "train.eval_every_epochs=1",
        "synth.num_images=40",
        env=head.env(MLFLOW_TRACKING_URI=tracking_uri),
        timeout=540,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "box AP (synthetic val):" in result.stdout  # the job's logs came back
    assert f"MLflow run:   {tracking_uri} run " in result.stdout
    assert "SUCCEEDED" in result.stderr and f"environment:  MLFLOW_TRACKING_URI={tracking_uri}" in result.stderr
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "qs" / "parquet" / "train").is_dir()

    (submission_id,) = re.findall(r"submitted job (\S+) to", result.stderr)
    job = head.client().get_job_info(submission_id)
    assert job.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": tracking_uri}  # in the runtime env ...
    assert "MLFLOW" not in job.entrypoint and "mlflow.db" not in job.entrypoint  # ... not in the command line
    print(f"quickstart job: {elapsed:.0f} s end to end")

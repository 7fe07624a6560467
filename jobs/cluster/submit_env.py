"""What a job submitted by ``dhrcnn submit`` carries to the cluster: the project as its working directory and a
runtime environment with the S3 and MLflow settings of the submitting shell.

**Settings** (:data:`SETTINGS`: endpoint, region, tracking URI, experiment…) present in the submitting
environment are forwarded through the runtime environment's ``env_vars``, where they override the cluster's
own values for this job (``forward_settings=False`` keeps the cluster's).

**Credentials** (:data:`CREDENTIALS`) are expected on the cluster: an IAM role / instance profile / IRSA, or the
Kubernetes Secret of ``infra/kuberay/config.yaml``. ``forward_credentials=True`` (``--forward-credentials``)
forwards the submitting shell's through ``env_vars`` too, never through the command line. Runtime environments
are stored with the job on the cluster and shown to whoever can read its dashboard, which is why this is opt-in.
``RAY_AUTH_TOKEN`` is never forwarded (the job's driver uses the cluster's own).

Values are printed only through :meth:`JobEnvironment.describe`: credentials as ``***``, passwords inside URLs
(``https://user:***@host``) hidden.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from jobs.redact import MASK, has_url_password, is_secret_key, redact_value

# Non-secret settings forwarded by default (when set in the submitting environment).
SETTINGS: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_MAX_ATTEMPTS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_INSECURE_TLS",
)
# Forwarded only with forward_credentials=True.
CREDENTIALS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Values that must never appear in a job's command line or output (credentials, and the Ray token).
SECRET_VARIABLES: tuple[str, ...] = (*CREDENTIALS, "RAY_AUTH_TOKEN")

# gitwildmatch patterns relative to the project root, as Ray's runtime_env "excludes" reads them; a pattern
# without "/" matches a name at any depth, "/name" only at the root. Ray also honours .gitignore and .rayignore.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "mlruns",
    "*.db",
    "*.sqlite",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "/runs",
    "/dhrcnn_runs",
    "/dhrcnn_quickstart",
    "/data",
    "/datasets",
    "/outputs",
    "/checkpoints",
    "/build",
    "/dist",
    # credentials never travel with the code: they reach a job through its environment (--forward-credentials)
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    ".netrc",
    ".aws",
    ".ray",
    "credentials",
    "*credentials*.json",
    "*credentials*.yaml",
    "*credentials*.yml",
    "*secret*.yaml",
    "*secret*.yml",
    "*secret*.json",
    "auth_token",
)
# The dashboard accepts job-submission uploads up to 100 MiB (zipped; Ray's DASHBOARD_CLIENT_MAX_SIZE).
UPLOAD_LIMIT_BYTES = 100 * 1024**2

_OVERRIDE = re.compile(r"([A-Za-z_][\w.-]*)=")  # a dotted config key override, ``data.storage.secret_key=…``
_LOOPBACK = re.compile(r"://(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:|/|$)")


@dataclass(frozen=True)
class JobEnvironment:
    """The runtime environment of a submitted job.

    Args:
        working_dir: the project root, uploaded and made the job's working directory (and on its PYTHONPATH).
        excludes: gitwildmatch patterns left out of the upload.
        env_vars: variables set for the job's driver and its Ray workers.
    """

    working_dir: str
    excludes: tuple[str, ...]
    env_vars: Mapping[str, str]

    def runtime_env(self) -> dict[str, Any]:
        """The ``runtime_env`` dict for ``JobSubmissionClient.submit_job``."""
        return {"working_dir": self.working_dir, "excludes": list(self.excludes), "env_vars": dict(self.env_vars)}

    def describe(self) -> list[str]:
        """``NAME=value`` per variable, safe to print (see :func:`redact`)."""
        return [f"{name}={redact(name, value)}" for name, value in sorted(self.env_vars.items())]


def build_job_environment(
    working_dir: Path,
    environ: Mapping[str, str],
    *,
    forward_settings: bool = True,
    forward_credentials: bool = False,
) -> JobEnvironment:
    """The job's runtime environment from the submitting process's ``environ``.

    Args:
        working_dir: the project root (must hold ``pyproject.toml`` and ``jobs/``).
        environ: the submitting environment (``os.environ``).
        forward_settings: forward the :data:`SETTINGS` that are set.
        forward_credentials: forward the :data:`CREDENTIALS` that are set.

    Raises:
        ValueError: ``working_dir`` is not this project's source tree.
    """
    root = working_dir.resolve()
    if not (root / "pyproject.toml").is_file() or not (root / "jobs" / "cli.py").is_file():
        raise ValueError(
            f"{root} is not a dhrcnn source checkout (no pyproject.toml / jobs/cli.py): `dhrcnn submit` uploads "
            "the project as the job's working directory, so run it from a clone of the repository "
            "(pip install -e .)."
        )
    names = (SETTINGS if forward_settings else ()) + (CREDENTIALS if forward_credentials else ())
    env_vars = {name: environ[name] for name in names if environ.get(name)}
    return JobEnvironment(str(root), WORKING_DIR_EXCLUDES, env_vars)


def environment_notes(env: JobEnvironment) -> list[str]:
    """Warnings about forwarded settings that are likely wrong on a cluster (printed, never fatal)."""
    notes = []
    for name, value in sorted(env.env_vars.items()):
        if name in SETTINGS and _LOOPBACK.search(value):
            notes.append(
                f"{name} points at this machine ({redact(name, value)}): right for a Ray head on this machine, "
                "wrong for a remote cluster or one in containers (there, use --no-forward-settings to keep the "
                "cluster's own settings, or export the address the cluster reaches)."
            )
    uri = env.env_vars.get("MLFLOW_TRACKING_URI")
    if uri is None:
        notes.append(
            "MLFLOW_TRACKING_URI is not forwarded: the job tracks to the cluster's MLFLOW_TRACKING_URI, else to "
            "sqlite:///mlflow.db in its temporary working directory on the head (lost with it)."
        )
    elif re.match(r"(sqlite:///|file:)(?!/)", uri) or ("://" not in uri and not uri.startswith("/")):
        notes.append(
            f"MLFLOW_TRACKING_URI={redact('MLFLOW_TRACKING_URI', uri)} is relative: on the cluster it resolves in "
            "the job's temporary working directory. Use an absolute path or a tracking server."
        )
    return notes


def redact(name: str, value: str) -> str:
    """``value`` safe to print: ``***`` for a secret variable, URLs redacted (:mod:`jobs.redact`)."""
    return MASK if name in SECRET_VARIABLES else redact_value(name, value)


def secrets_in_args(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Why ``args`` must not become a job's command line: the names of the secret variables whose values they
    contain, ``"a URL with a password"``, and the secret-named config overrides (``data.storage.secret_access_key=…``);
    empty when they are clean."""
    found = [
        name
        for name in SECRET_VARIABLES
        if len(environ.get(name, "")) >= 4 and any(environ[name] in arg for arg in args)
    ]
    if any(has_url_password(arg) for arg in args):
        found.append("a URL with a password or a secret query value")
    overrides = [m.group(1) for arg in args if (m := _OVERRIDE.match(arg))]
    found += [f"the secret override {key}=…" for key in overrides if is_secret_key(key)]
    return found


@dataclass(frozen=True)
class WorkingDirSize:
    """What the upload of a working directory holds, before Ray's zip: an upper bound (it ignores .gitignore).

    Args:
        files: number of files.
        total_bytes: their size, uncompressed.
        largest: the biggest top-level entries, ``(name, bytes)``, biggest first.
    """

    files: int
    total_bytes: int
    largest: tuple[tuple[str, int], ...]

    def summary(self) -> str:
        """``"108 files, 0.6 MiB"``."""
        return f"{self.files} files, {self.total_bytes / 1024**2:.1f} MiB"


def measure_working_dir(root: Path, excludes: Sequence[str], *, top: int = 5) -> WorkingDirSize:
    """Walk ``root`` as Ray will upload it, leaving out ``excludes`` (patterns without ``/`` match a name at any
    depth, ``/name`` a top-level entry; a trailing ``/`` is not supported); symbolic links are not followed."""
    files = 0
    per_entry: dict[str, int] = {}
    for top_entry in sorted(root.iterdir()):
        if _excluded(top_entry.name, top_entry.name, excludes):
            continue
        size, count = _tree_size(top_entry, root, excludes)
        files += count
        per_entry[top_entry.name] = size
    largest = tuple(sorted(per_entry.items(), key=lambda item: -item[1])[:top])
    return WorkingDirSize(files, sum(per_entry.values()), largest)


def _tree_size(path: Path, root: Path, excludes: Sequence[str]) -> tuple[int, int]:
    if path.is_symlink() or not path.is_dir():
        try:
            return (path.lstat().st_size, 1)
        except OSError:
            return (0, 0)
    size = count = 0
    for dirpath, dirnames, filenames in os.walk(path):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames if not _excluded(d, f"{rel_dir}/{d}", excludes)]
        for name in filenames:
            if _excluded(name, f"{rel_dir}/{name}", excludes):
                continue
            try:
                size += (Path(dirpath) / name).lstat().st_size
                count += 1
            except OSError:
                continue
    return size, count


def _excluded(name: str, rel_path: str, excludes: Sequence[str]) -> bool:
    for pattern in excludes:
        if pattern.startswith("/"):
            if fnmatchcase(rel_path, pattern[1:]):
                return True
        elif fnmatchcase(name, pattern):
            return True
    return False

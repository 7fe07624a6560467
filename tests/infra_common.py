"""Shared paths, constants and YAML helpers of the ``infra/`` checks (``tests/test_infra_*.py``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
MLFLOW_DOCKERFILE = INFRA / "local" / "mlflow.Dockerfile"
COMPOSE = INFRA / "local" / "docker-compose.yml"
ENV_EXAMPLE = INFRA / "local" / ".env.example"

IMAGE = "ghcr.io/OWNER/dhrcnn:0.1.0"  # the placeholder every manifest must use (one image everywhere)
WORKDIR = "/home/ray/dhrcnn"
ENTRYPOINT = "dhrcnn train --config configs/dh_r50_fpn_1x_coco.yaml"
SETTINGS_CONFIGMAP = "dhrcnn-settings"
S3_SECRET = "dhrcnn-s3-credentials"
AUTH_SECRET = "dhrcnn-ray-auth"

# Every AWS_*/MLFLOW_* variable the pipeline reads must be provided by the cluster, or be listed as optional.
CONFIGMAP_VARS = {"AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI"}
SECRET_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
OPTIONAL_VARS = {
    "AWS_ENDPOINT_URL_S3": "an S3-only override of AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": "a fallback for AWS_REGION",
    "AWS_SESSION_TOKEN": "only for temporary credentials",
    "AWS_MAX_ATTEMPTS": "defaults to 3",
    "AWS_EC2_METADATA_DISABLED": "set by jobs/local_s3.py for the local moto server only (no instance metadata)",
    # MLflow's own variables, forwarded by `dhrcnn submit` when set on the submitting machine
    "MLFLOW_EXPERIMENT_NAME": "defaults to tracking.experiment_name",
    "MLFLOW_REGISTRY_URI": "defaults to the tracking URI",
    "MLFLOW_S3_ENDPOINT_URL": "only for a tracking server without artifact proxying",
    "MLFLOW_TRACKING_INSECURE_TLS": "only for a server with a self-signed certificate",
    "MLFLOW_TRACKING_USERNAME": "only for a tracking server with basic auth",
    "MLFLOW_TRACKING_PASSWORD": "only for a tracking server with basic auth",
    "MLFLOW_TRACKING_TOKEN": "only for a tracking server with token auth",
}

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.")
REAL_SECRET = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),  # AWS secret access key shape
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9])[0-9a-f]{32,}(?![A-Za-z0-9])"),  # hex tokens (openssl rand -hex)
]
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $${...} is an escaped literal.
COMPOSE_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=LOADER)


def load_yaml_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=LOADER) if doc is not None]


def strings(value: Any) -> Iterator[str]:
    """Every string (keys included) in a nested YAML value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def looks_like_real_secret(value: str) -> bool:
    return any(pattern.search(value) for pattern in REAL_SECRET)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a dotenv file (comments and blank lines skipped, one level of quotes removed)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and ENV_NAME.match(key), f"{path}:{number}: expected KEY=value, got {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


# the KubeRay manifests (file under infra/kuberay -> kind)
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayjob-existing-cluster.yaml": "RayJob"}


def schema_errors(validator: Any, manifest: Any) -> list[str]:
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]

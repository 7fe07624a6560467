"""Offline checks of ``infra/cluster-launcher``: the Ray cluster launcher YAML goes through Ray's own
``prepare_config`` + ``validate_config`` (no AWS call), plus layout, credential and shell-syntax rules."""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from jobs.redact import is_secret_key
from tests.infra_common import (
    GPU_INSTANCE,
    IMAGE,
    LAUNCHER,
    ROOT,
    load_yaml,
    looks_like_real_secret,
    read_env_file,
    strings,
)

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
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "a GPU instance as the head is wasted"
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert GPU_INSTANCE.match(node["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
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

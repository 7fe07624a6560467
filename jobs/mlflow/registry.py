"""Model registry operations behind ``dhrcnn models list / promote / pull``.

Every function takes an optional ``tracking_uri`` (``None``: ``MLFLOW_TRACKING_URI``, else the local
``sqlite:///<cwd>/mlflow.db``), checks that a tracking server answers (bounded, seconds) and turns MLflow's
errors into :class:`RegistryError` messages that say what exists: the registered names, a model's aliases, its
versions. :func:`pull` accepts only pyfuncs written by :func:`jobs.mlflow.pyfunc_model.log_detector`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.evaluate.coco_eval import STAT_NAMES
from jobs.mlflow.pyfunc_model import FORMAT, file_sha256
from jobs.mlflow.uri import TrackingError, check_reachable, resolve_tracking_uri, tracking_uri_scope
from jobs.redact import redact_url

CHAMPION = "champion"


class RegistryError(TrackingError):
    """A registry request cannot be served; the message names what was asked for and what exists."""


@dataclass(frozen=True)
class ModelRow:
    """One registered model version.

    Attributes:
        name: registered model name.
        version: version number as a string.
        aliases: aliases pointing at this version (e.g. ``("champion",)``).
        ap: the version's ``AP`` tag (box AP on the training run's val split), ``None`` if absent.
        run_id: the training run.
        source: the logged model's URI (``models:/m-...``) or artifact location.
        created_ms: creation time, milliseconds since the epoch.
    """

    name: str
    version: str
    aliases: tuple[str, ...]
    ap: float | None
    run_id: str | None
    source: str
    created_ms: int


def _client(tracking_uri: str | None) -> tuple[Any, str]:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise RegistryError(
            f"no MLflow database at {uri[len('sqlite:///') :]}: run a training job first, or point "
            "MLFLOW_TRACKING_URI / --tracking-uri at the store holding the models"
        )
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _row(version: Any, aliases: tuple[str, ...]) -> ModelRow:
    ap = version.tags.get("AP")
    return ModelRow(
        name=version.name,
        version=str(version.version),
        aliases=aliases,
        ap=float(ap) if ap is not None else None,
        run_id=version.run_id or None,
        source=str(version.source),
        created_ms=int(version.creation_timestamp or 0),
    )


def _registered_model(client: Any, name: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{redact_url(uri)}: {err.message}") from err
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model {name!r} in {redact_url(uri)} (registered: {', '.join(names) or 'none'})"
        ) from err


def list_models(name: str | None = None, tracking_uri: str | None = None) -> list[ModelRow]:
    """All versions of registered model ``name`` (or of every registered model), newest first per name."""
    client, uri = _client(tracking_uri)
    models = [_registered_model(client, name, uri)] if name else list(client.search_registered_models())
    rows: list[ModelRow] = []
    for registered in sorted(models, key=lambda m: m.name):
        alias_of: dict[str, list[str]] = {}
        for alias, version in (registered.aliases or {}).items():
            alias_of.setdefault(str(version), []).append(alias)
        quoted = registered.name.replace("'", "\\'")
        versions = client.search_model_versions(f"name = '{quoted}'")
        for version in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(_row(version, tuple(sorted(alias_of.get(str(version.version), [])))))
    return rows


def promote(name: str, version: str | int, alias: str = "champion", tracking_uri: str | None = None) -> ModelRow:
    """Point ``alias`` of registered model ``name`` at ``version`` (moving it from wherever it was)."""
    from mlflow.exceptions import MlflowException

    client, uri = _client(tracking_uri)
    registered = _registered_model(client, name, uri)
    try:
        target = client.get_model_version(name, str(version))
    except MlflowException as err:
        quoted = name.replace("'", "\\'")
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{quoted}'"))
        raise RegistryError(
            f"registered model {name!r} has no version {version} (versions: {', '.join(map(str, known)) or 'none'})"
        ) from err
    try:
        client.set_registered_model_alias(name, alias, str(target.version))
    except MlflowException as err:  # e.g. "latest" or "v3", reserved by MLflow
        raise RegistryError(f"cannot set alias {alias!r} on {name!r}: {err.message}") from err
    aliases = {a for a, v in (registered.aliases or {}).items() if str(v) == str(target.version)} | {alias}
    return _row(target, tuple(sorted(aliases)))


def resolve_artifact_uri(model_uri: str, tracking_uri: str | None = None) -> str:
    """The artifact location behind ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/m-ID``
    (other URIs, e.g. ``runs:/`` or a folder, are returned unchanged). Clear errors for unknown names,
    aliases and versions."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        return model_uri
    client, uri = _client(tracking_uri)
    ref = model_uri[len("models:/") :].strip("/")
    if _is_logged_model(ref):
        try:
            return str(client.get_logged_model(ref).artifact_location)
        except MlflowException as err:
            raise RegistryError(f"no logged model {ref!r} in {redact_url(uri)}") from err
    name, version = registered_version(client, model_uri, uri)
    try:
        return str(client.get_model_version_download_uri(name, version))
    except MlflowException as err:
        raise RegistryError(f"registered model {name!r} has no version {version}") from err


def _is_logged_model(ref: str) -> bool:
    """Whether ``models:/<ref>`` names a logged model (``m-<id>``) rather than a registry version or alias."""
    return ref.startswith("m-") and "/" not in ref and "@" not in ref


def registered_version(client: Any, model_uri: str, uri: str) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME@ALIAS`` (the alias resolved now) or ``models:/NAME/VERSION``."""
    ref = model_uri[len("models:/") :].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        registered = _registered_model(client, name, uri)
        aliases = registered.aliases or {}
        if alias not in aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (aliases: {known})")
        return name, str(aliases[alias])
    name, _, version = ref.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"bad model URI {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    _registered_model(client, name, uri)
    return name, version


def check_detector(model_uri: str, tracking_uri: str | None = None) -> str:
    """The artifact URI of the detector pyfunc at ``model_uri`` (an alias resolved to its version now), checked
    from its ``MLmodel`` file alone (before any weights are downloaded). Raises ``TrackingError`` (unreachable
    server) or :class:`RegistryError` (unknown name, alias or version; no MLflow model there; another flavour)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    if model_uri.startswith("runs:/"):
        check_reachable(uri)
    artifact_uri = resolve_artifact_uri(model_uri, uri)
    try:
        with tempfile.TemporaryDirectory(prefix="dhrcnn-mlmodel-") as tmp, tracking_uri_scope(uri):
            mlmodel = mlflow.artifacts.download_artifacts(f"{artifact_uri.rstrip('/')}/MLmodel", dst_path=tmp)
            _check_flavor(Path(mlmodel), model_uri)
            expected = _registered_sha256(model_uri, uri)
            if expected is not None:
                spec_file = f"{artifact_uri.rstrip('/')}/artifacts/detector.json"
                spec = json.loads(Path(mlflow.artifacts.download_artifacts(spec_file, dst_path=tmp)).read_text())
                recorded = str(spec.get("weights_sha256"))
                if recorded != expected:
                    raise RegistryError(
                        f"{model_uri}: its detector.json records weights sha256 {recorded[:16]}… "
                        f"but the version was registered with {expected[:16]}…: the model's artifacts changed after "
                        "registration; do not load it"
                    )
    except (MlflowException, OSError) as err:
        message = (getattr(err, "message", None) or str(err)).splitlines()[0]
        raise RegistryError(f"{model_uri}: no MLflow model there ({redact_url(artifact_uri)}: {message})") from err
    return artifact_uri


def _registered_sha256(model_uri: str, uri: str) -> str | None:
    """The ``weights_sha256`` tag of the registry version ``model_uri`` names (``None``: not a registry URI, or a
    version registered before hashes were recorded)."""
    ref = model_uri[len("models:/") :].strip("/") if model_uri.startswith("models:/") else ""
    if not ref or _is_logged_model(ref):
        return None
    client, _ = _client(uri)
    name, version = registered_version(client, model_uri, uri)
    return client.get_model_version(name, version).tags.get("weights_sha256")


def _check_flavor(mlmodel_path: Path, model_uri: str) -> None:
    spec = yaml.safe_load(mlmodel_path.read_text()) or {}
    flavors = spec.get("flavors") or {}
    ours = (spec.get("metadata") or {}).get("dhrcnn_format") == FORMAT and "python_function" in flavors
    if not ours:
        raise RegistryError(
            f"{model_uri} is not a Double-Head detector pyfunc (flavors: {', '.join(sorted(flavors)) or 'none'}; "
            f"metadata.dhrcnn_format is not {FORMAT!r}). Use a model logged by `dhrcnn train`."
        )


def pull(model_uri: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the detector pyfunc at ``model_uri`` into ``out_dir`` (created; must be empty) and return it.

    The folder is a complete MLflow model: ``mlflow.pyfunc.load_model(out_dir)`` or
    :func:`jobs.mlflow.pyfunc_model.load_detector` predicts with it; ``artifacts/detector.json`` holds the label map,
    preprocessing, metrics and training config. Raises :class:`RegistryError` for unknown names, aliases or
    versions and for models of another flavour (checked on the ``MLmodel`` file before the weights download).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    artifact_uri = resolve_artifact_uri(model_uri, uri)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out} is not empty; pull into a new folder")
    try:
        repo = get_artifact_repository(artifact_uri, tracking_uri=uri, registry_uri=uri)
        with tempfile.TemporaryDirectory(prefix="dhrcnn-pull-") as tmp:
            try:
                mlmodel = Path(repo.download_artifacts("MLmodel", dst_path=tmp))
            except (MlflowException, OSError) as err:
                raise RegistryError(f"{model_uri} ({artifact_uri}) holds no MLflow model (no MLmodel file)") from err
            _check_flavor(mlmodel, model_uri)
        out.mkdir(parents=True, exist_ok=True)
        repo.download_artifacts("", dst_path=str(out))
    except MlflowException as err:
        raise RegistryError(f"cannot download {model_uri} from {redact_url(uri)}: {err.message}") from err
    expected = _registered_sha256(model_uri, uri)
    found = file_sha256(out / "artifacts" / "weights.pt") if expected is not None else None
    if found != expected:
        shutil.rmtree(out)
        raise RegistryError(
            f"{model_uri}: the downloaded weights have sha256 {str(found)[:16]}… but the version was registered with "
            f"{str(expected)[:16]}…: the model's artifacts changed after registration; nothing was kept"
        )
    return out


def _metric(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name, metrics.get(f"val/{name}"))
    return None if value is None or not math.isfinite(float(value)) else float(value)


def register_detector(
    model_uri: str,
    name: str,
    metrics: Mapping[str, Any],
    tracking_uri: str | None = None,
    *,
    once_for_run: str | None = None,
) -> str:
    """Register the detector logged at ``model_uri`` (``models:/m-...``, by
    :func:`jobs.mlflow.pyfunc_model.log_detector`) as a new version of ``name``, tagged with its COCO metrics (bare or
    ``val/``-prefixed keys of ``metrics``; other entries ignored), and move alias ``champion`` to it if its AP
    beats the champion's (a model without AP never replaces an existing champion; :func:`promote_if_better`).
    With ``once_for_run`` (an MLflow run id), a version that run already registered under ``name`` is returned
    instead (:func:`version_of_run`): a retried job registers once. Returns the version."""
    numbers = {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    import mlflow

    with tracking_uri_scope(tracking_uri):
        client = mlflow.MlflowClient()
        if once_for_run is not None and (existing := version_of_run(client, name, once_for_run)) is not None:
            return existing
        tags = {k: f"{v:.6g}" for k in STAT_NAMES if (v := _metric(numbers, k)) is not None}
        sha = (mlflow.models.get_model_info(model_uri).metadata or {}).get("weights_sha256")
        tags |= {"format": FORMAT} | ({"weights_sha256": sha} if sha else {})
        version = mlflow.register_model(model_uri, name, tags=tags)
        promote_if_better(client, name, str(version.version), _metric(numbers, "AP"))
    return str(version.version)


def version_of_run(client: Any, name: str, run_id: str) -> str | None:
    """The lowest version of ``name`` whose model the MLflow run ``run_id`` logged, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise
    return min((str(v.version) for v in versions), key=int, default=None)


def champion_ap(client: Any, name: str, alias: str = CHAMPION) -> tuple[str | None, float | None]:
    """``(version, AP)`` of the version holding ``alias`` (``(None, None)`` without one). AP comes from the
    version's ``AP`` tag, else its run's ``val/AP`` / ``AP`` metric."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None, None
        raise
    if "AP" in holder.tags:
        return str(holder.version), float(holder.tags["AP"])
    if holder.run_id:
        return str(holder.version), _metric(client.get_run(holder.run_id).data.metrics, "AP")
    return str(holder.version), None


def promote_if_better(
    client: Any, name: str, version: str, ap: float | None, *, rounds: int = 5, settle_s: float = 0.5
) -> bool:
    """Move ``champion`` to ``version`` when there is no champion or ``ap`` is strictly higher than its AP, as a
    compare-and-set: after setting, wait ``settle_s`` and read the alias again; if a concurrent job has since put
    a worse version there (it read the old champion before our write), set it again, up to ``rounds`` times.
    Returns whether ``version`` holds ``champion`` at the end."""
    for _ in range(rounds):
        current, current_ap = champion_ap(client, name)
        if current == version:
            return True
        better = ap is not None and (current_ap is None or ap > current_ap)
        if current is not None and not better:
            return False
        client.set_registered_model_alias(name, CHAMPION, version)
        time.sleep(settle_s)
    return champion_ap(client, name)[0] == version

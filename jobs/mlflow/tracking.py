"""MLflow tracking for training jobs: one run per job, resumable, logged from rank 0 only.

The driver calls :func:`ensure_tracking_store` once, before any worker starts: it resolves the tracking URI
(config, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``) to an absolute one, creates the
sqlite database and the experiment, and fails within seconds, naming the URI, when a tracking server does not
answer. Each Ray Train worker builds a :class:`Tracker` from the returned config with ``enabled=(rank == 0)``;
a disabled tracker does nothing, so the training loop calls it unconditionally.

After a restart, ``Tracker.start(run_id)`` continues the same run and drops metric points whose step is not
beyond the last step already logged for that key, so a run never holds a step twice. Parameters come from
:func:`flatten_config`, which removes secrets (keys naming a secret, password, token, access key or
credentials; passwords inside URLs) before anything reaches MLflow.

:class:`Tracker` uses an ``MlflowClient`` bound to the config's URI; MLflow's process-global tracking URI is
changed only inside :func:`tracking_uri_scope` (for the pyfunc logger), which restores it.
"""

from __future__ import annotations

import contextlib
import importlib
import platform
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.mlflow.uri import TrackingError, check_reachable, resolve_tracking_uri
from jobs.redact import is_secret_key, redact_config, redact_url

DEFAULT_EXPERIMENT = "double-head-frcnn"
DEFAULT_MODEL_NAME = "double-head-frcnn"
MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LENGTH = 250
_PARAM_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
_METRIC_BATCH = 1000


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how a job is tracked.

    Attributes:
        tracking_uri: MLflow tracking URI; ``None``: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``
            (resolved to an absolute URI by :func:`ensure_tracking_store` on the driver).
        experiment_name: experiment holding the job's run.
        registered_model_name: registry name of the final model; ``None`` logs the model without registering.
        run_name: display name of a new run (``None``: MLflow picks one).
        connect_timeout_s: per-attempt timeout of the reachability check of a tracking server (2 attempts).
    """

    tracking_uri: str | None = None
    experiment_name: str = DEFAULT_EXPERIMENT
    registered_model_name: str | None = DEFAULT_MODEL_NAME
    run_name: str | None = None
    connect_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0:
            raise ValueError(f"tracking.connect_timeout_s: expected > 0, got {self.connect_timeout_s}")
        if not self.experiment_name:
            raise ValueError("tracking.experiment_name: must not be empty")


def ensure_tracking_store(cfg: TrackingConfig) -> TrackingConfig:
    """Driver-side, once before workers start: resolve the URI, check a server answers, create the sqlite
    database and the experiment. Returns ``cfg`` with the absolute ``tracking_uri`` to hand to workers.

    For a new sqlite store the experiment's artifacts go to ``mlruns/`` next to the database file.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_reachable(uri, cfg.connect_timeout_s)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        experiment_id(MlflowClient(tracking_uri=uri), cfg.experiment_name, uri)
    except MlflowException as err:
        raise TrackingError(f"cannot use MLflow tracking store {redact_url(uri)}: {err.message}") from err
    return replace(cfg, tracking_uri=uri)


def without_secrets(cfg: TrackingConfig) -> TrackingConfig:
    """``cfg`` with its URI's password and secret query values masked (:func:`jobs.redact.redact_url`): what may
    be handed to anything that keeps or prints it (Ray Train's ``train_loop_config``, Tune's trial files). It
    cannot reach a store that needs those credentials."""
    return cfg if cfg.tracking_uri is None else replace(cfg, tracking_uri=redact_url(cfg.tracking_uri))


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing (a sqlite store's artifacts go next to the DB)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` for MLflow params, secrets removed.

    Lists and tuples become their ``repr``-like string (``[1, 2]``); ``None`` becomes ``"None"``. Values are
    truncated to MLflow's 6000 characters, keys to 250. Keys matching :func:`is_secret_key` at any level are
    dropped with everything below them.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if is_secret_key(str(key)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name))
            continue
        if isinstance(value, tuple):
            value = list(value)
        text = redact_url(str(value))
        flat[name[:MAX_KEY_LENGTH]] = text[:MAX_PARAM_VALUE_LENGTH]
    return flat


def git_commit(path: str | Path | None = None) -> str | None:
    """The ``HEAD`` commit of the git checkout holding ``path`` (default: this project), or ``None``."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def run_tags(dataset_fingerprint: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags for a job's run: git commit, dataset fingerprint, versions of python/torch/torchvision/ray/mlflow."""
    tags: dict[str, str] = {"version.python": platform.python_version()}
    for package in ("torch", "torchvision", "ray", "mlflow"):
        with contextlib.suppress(ImportError, AttributeError):  # __version__ keeps local tags such as "+cu130"
            tags[f"version.{package}"] = str(importlib.import_module(package).__version__)
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    if dataset_fingerprint:
        tags["dataset.fingerprint"] = dataset_fingerprint
    tags.update({str(k): redact_url(str(v)) for k, v in (extra or {}).items() if not is_secret_key(str(k))})
    return tags


class Tracker:
    """One MLflow run of a job, logged from rank 0; every method is a no-op when ``enabled`` is false.

    Usage (worker)::

        tracker = Tracker(tracking_cfg, enabled=rank == 0)
        run_id = tracker.start(checkpoint_run_id)      # None: new run; else resume that run
        tracker.log_config(resolved_config)            # params + redacted config.yaml
        tracker.set_tags(run_tags(manifest_fingerprint))
        tracker.log_metrics({"loss": 0.7, "lr": 0.02}, step=iteration)
        tracker.end("FINISHED")
    """

    def __init__(self, cfg: TrackingConfig, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
        self._client: Any = None
        self._run_id: str | None = None
        self._last_step: dict[str, int] = {}

    @property
    def run_id(self) -> str | None:
        """The run being logged to (``None`` before :meth:`start` or when disabled and never given one)."""
        return self._run_id

    def start(self, run_id: str | None = None) -> str | None:
        """Start a new run, or resume ``run_id`` (status back to RUNNING; metric steps already logged are
        remembered so that re-logged steps are dropped). Returns the run id (``run_id`` when disabled)."""
        if not self.enabled:
            self._run_id = run_id
            return run_id
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        check_reachable(self.tracking_uri, self.cfg.connect_timeout_s)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException as err:
                where = redact_url(self.tracking_uri)
                raise TrackingError(f"cannot resume MLflow run {run_id} in {where}: {err.message}") from err
            history = self._client.get_metric_history
            self._last_step = {k: max((m.step for m in history(run_id, k)), default=-1) for k in run.data.metrics}
            self._client.update_run(run_id, status="RUNNING")
            self._run_id = run_id
            return run_id
        experiment = experiment_id(self._client, self.cfg.experiment_name, self.tracking_uri)
        run = self._client.create_run(experiment, run_name=self.cfg.run_name)
        self._run_id = run.info.run_id
        self._last_step = {}
        return self._run_id

    def attach(self, run_id: str) -> str | None:
        """Log into the existing run ``run_id`` as it is (its status unchanged, e.g. to add a model to a finished
        run). Returns ``run_id``; raises :class:`TrackingError` if the store has no such run."""
        if not self.enabled:
            self._run_id = run_id
            return run_id
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        check_reachable(self.tracking_uri, self.cfg.connect_timeout_s)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            self._client.get_run(run_id)
        except MlflowException as err:
            where = redact_url(self.tracking_uri)
            raise TrackingError(f"no MLflow run {run_id} in {where}: {err.message}") from err
        self._run_id = run_id
        return run_id

    def _require_run(self) -> str:
        if self._run_id is None or self._client is None:
            raise RuntimeError("Tracker.start() must be called before logging")
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (possibly nested) config as params via :func:`flatten_config`. On a resumed run, params
        already present are skipped (MLflow forbids changing them); changed values are recorded as tags
        ``param_changed_on_resume.<key>``."""
        if not self.enabled:
            return
        from mlflow.entities import Param, RunTag

        run_id = self._require_run()
        flat = flatten_config(params)
        existing = self._client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = [
            RunTag(f"param_changed_on_resume.{k}"[:MAX_KEY_LENGTH], v)
            for k, v in flat.items()
            if k in existing and existing[k] != v
        ]
        for i in range(0, len(new), _PARAM_BATCH):
            self._client.log_batch(run_id, params=new[i : i + _PARAM_BATCH])
        for i in range(0, len(changed), _PARAM_BATCH):
            self._client.log_batch(run_id, tags=changed[i : i + _PARAM_BATCH])

    def log_config(self, config: Mapping[str, Any], artifact_file: str = "config.yaml") -> None:
        """Params from ``config`` plus the redacted config as a YAML artifact (no secrets in either)."""
        if not self.enabled:
            return
        import yaml

        self.log_params(config)
        self.log_text(yaml.safe_dump(redact_config(config), sort_keys=False), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings; secret-named keys dropped). See :func:`run_tags`."""
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        run_id = self._require_run()
        items = [RunTag(str(k), redact_url(str(v))) for k, v in tags.items() if not is_secret_key(str(k))]
        for i in range(0, len(items), _PARAM_BATCH):
            self._client.log_batch(run_id, tags=items[i : i + _PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar ``metrics`` (floats, ints or 0-d tensors) at ``step``; keys whose last logged step is
        ``>= step`` (a replay after a resume) are skipped."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        run_id, now = self._require_run(), int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if step > self._last_step.get(k, -1)]
        for i in range(0, len(batch), _METRIC_BATCH):
            self._client.log_batch(run_id, metrics=batch[i : i + _METRIC_BATCH])
            self._last_step.update({m.key: int(step) for m in batch[i : i + _METRIC_BATCH]})  # sent: not again

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents under ``artifact_path`` of the run."""
        if not self.enabled:
            return
        upload = self._client.log_artifacts if Path(local_path).is_dir() else self._client.log_artifact
        upload(self._require_run(), str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` to the run's artifact ``artifact_file`` (e.g. ``"eval/per_class_ap.md"``)."""
        if not self.enabled:
            return
        self._client.log_text(self._require_run(), text, artifact_file)

    def log_detector(
        self,
        *,
        metrics: Mapping[str, float],
        registered_model_name: str | None = None,
        once_per_run: bool = False,
        **kwargs: Any,
    ) -> tuple[str, str | None] | None:
        """Log the detector into this run (:func:`jobs.mlflow.pyfunc_model.log_detector`, same arguments) and
        register it (:func:`jobs.mlflow.registry.register_detector`) under ``registered_model_name``, else the
        config's name (not registered when that is ``None``). With ``once_per_run``, a version this run registered
        already is returned and nothing is logged again (a job retried after its export). Returns ``(model URI,
        version or None)``; ``None`` when disabled."""
        if not self.enabled:
            return None
        from jobs.mlflow.pyfunc_model import log_detector
        from jobs.mlflow.registry import register_detector, version_of_run

        run_id = self._require_run()
        name = registered_model_name or self.cfg.registered_model_name
        if once_per_run and name is not None and (version := version_of_run(self._client, str(name), run_id)):
            return f"models:/{name}/{version}", version
        model_uri = log_detector(metrics=metrics, run_id=run_id, tracking_uri=self.tracking_uri, **kwargs)
        if name is None:
            return model_uri, None
        once = run_id if once_per_run else None
        version = register_detector(model_uri, str(name), metrics, tracking_uri=self.tracking_uri, once_for_run=once)
        return model_uri, version

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``. A job that will resume need not call it."""
        if not self.enabled or self._run_id is None or self._client is None:
            return
        self._client.set_terminated(self._run_id, status=status)


def end_run(cfg: TrackingConfig, run_id: str, status: str) -> None:
    """Mark ``run_id`` ``status`` unless it has ended already (a worker that died without saying so leaves it
    RUNNING; the driver closes it). Tracking errors are reported, not raised: the job's own error matters."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking_uri))
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as err:  # never hide the job's failure behind a tracking one
        print(f"warning: could not mark MLflow run {run_id} {status}: {redact_url(str(err))}", flush=True)

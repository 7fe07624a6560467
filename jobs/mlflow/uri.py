"""Where MLflow is: the tracking URI resolved, checked for reachability, and set for MLflow's fluent API only
inside a scope. The base of the MLflow modules: the model format (:mod:`jobs.mlflow.pyfunc_model`), the registry
(:mod:`jobs.mlflow.registry`) and run tracking (:mod:`jobs.mlflow.tracking`) import it, in that one direction."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from jobs.redact import redact_url


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; local paths made absolute
    (Ray workers may run in another working directory)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return f"sqlite:///{Path(path).expanduser().absolute()}" if path and path != ":memory:" else uri
    if uri.startswith("file:") and not uri.startswith("file://"):
        return Path(uri[len("file:") :]).expanduser().absolute().as_uri()
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return Path(uri).expanduser().absolute().as_uri()
    return uri


def check_reachable(uri: str, timeout_s: float = 3.0, attempts: int = 2) -> None:
    """Raise :class:`TrackingError` unless the MLflow server at http(s) ``uri`` answers ``GET /health``.

    Any HTTP answer counts as reachable (a proxy may not expose ``/health``); only connection failures and
    timeouts do not. Bounded: at most ``attempts x timeout_s`` plus 0.5 s between attempts. Other URIs
    (sqlite, file, databricks) are not checked here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # never send userinfo in the probe
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(health, timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            error = err
            if attempt + 1 < attempts:
                time.sleep(0.5)
    reason = getattr(error, "reason", error)
    raise TrackingError(
        f"MLflow tracking server {redact_url(uri)} is unreachable ({reason}; {attempts} attempts of "
        f"{timeout_s:g}s). Start the server (`mlflow server --host ... --port ...`), or point "
        "tracking.tracking_uri / MLFLOW_TRACKING_URI at a reachable one (unset it for a local sqlite store)."
    )


@contextmanager
def tracking_uri_scope(uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API (process-global) at ``uri`` inside the block, then restore the previous URI and
    the ``MLFLOW_TRACKING_URI`` variable as they were. ``None``: leave everything as it is."""
    if uri is None:
        yield
        return
    import mlflow

    previous = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env

"""Reaching a Ray cluster's dashboard (the Jobs API) from outside: its address, whether it asks for a token,
and the token.

Ray ≥ 2.52 has token authentication (``RAY_AUTH_MODE=token`` on the cluster). Ray 2.60's ``ray start --head``
turns it on by itself when ``RAY_AUTH_MODE`` is unset and a token already exists on that machine
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, the file ``ray.init()`` and
``ray get-auth-token --generate`` write), and a local ``ray.init()`` turns it on by default; KubeRay sets it
with ``authOptions``. The dashboard then answers 401 to a request without ``Authorization: Bearer <token>``
and 403 to a wrong token; ``/api/authentication_mode`` is the one public endpoint that says which mode is on.

Ray's own client (``JobSubmissionClient``, ``ray job submit``) attaches the token only when the *client's*
``RAY_AUTH_MODE`` is ``token``. Here the cluster is asked instead (:func:`probe_dashboard`), and the token
is read the way Ray documents it (:func:`load_token`: ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) only when the cluster wants one; it is then passed
explicitly as a header, so a token never goes to a cluster that does not ask for it. A token is never printed:
:class:`AuthToken` hides it from ``repr`` and errors name only where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import requests

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# Enough for a head on the other side of the world; an address that does not answer fails within this.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0

HOW_TO_REACH = (
    "Check that a Ray head runs there and that this is its dashboard port (`ray start --head` serves the "
    "dashboard and the Jobs API on port 8265; `ray start --head --dashboard-port PORT` elsewhere); for "
    "KubeRay run `kubectl port-forward svc/dhrcnn-head-svc 8265:8265`, for the cluster launcher "
    "`ray dashboard CLUSTER.yaml`, then use http://127.0.0.1:8265."
)
HOW_TO_GET_A_TOKEN = (
    f"Set {TOKEN_ENV} to the cluster's token, or {TOKEN_PATH_ENV} to a file holding it, or put it in "
    "~/.ray/auth_token (KubeRay: `kubectl get secret dhrcnn-ray-auth -o jsonpath='{.data.auth_token}' | "
    "base64 -d`; the cluster launcher copies ~/.ray/auth_token to the nodes; a head started on this machine "
    "reads ~/.ray/auth_token too)."
)


class DashboardError(RuntimeError):
    """The dashboard could not be reached or refused us; the message names the address and what to do."""


@dataclass(frozen=True)
class AuthToken:
    """A Ray authentication token and where it was read from (``source``: a variable or a file, for messages).

    ``value`` stays out of ``repr``; use :meth:`header` to send it.
    """

    source: str
    value: str = field(repr=False)

    def header(self) -> dict[str, str]:
        """The HTTP header the dashboard checks."""
        return {"Authorization": f"Bearer {self.value}"}


def normalize_address(address: str) -> str:
    """``HOST:PORT`` or ``http(s)://HOST:PORT[/prefix]`` -> an ``http(s)://`` URL without a trailing slash.

    Raises:
        DashboardError: for addresses that are not the dashboard's HTTP address (``auto``, ``ray://``, …).
    """
    value = address.strip().rstrip("/")
    if "://" not in value and value not in ("", "auto", "local"):
        value = f"http://{value}"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DashboardError(
            f"{address!r} is not a Ray dashboard address: jobs are submitted over HTTP to the head's dashboard, "
            f"e.g. {DEFAULT_ADDRESS} (`ray://`, `auto` and the GCS port 6379 are ray.init() addresses). "
            "Pass --address http://HEAD:8265 or set RAY_ADDRESS to it."
        )
    return value


def resolve_address(cli_address: str | None, environ: Mapping[str, str]) -> str:
    """The dashboard URL: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` (the order of
    Ray's job CLI), else :data:`DEFAULT_ADDRESS`."""
    address = cli_address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    return normalize_address(address or DEFAULT_ADDRESS)


def probe_dashboard(address: str) -> bool:
    """Ask the dashboard at ``address`` whether it requires a token (its public ``/api/authentication_mode``).

    Returns ``True`` for token authentication, ``False`` when it is off (or the cluster predates it: 404).

    Raises:
        DashboardError: nothing answers within :data:`CONNECT_TIMEOUT_S` + :data:`READ_TIMEOUT_S`, or what
            answers is not a Ray dashboard.
    """
    response = _get(f"{address}/api/authentication_mode", address)
    mode = _json_field(response, "authentication_mode")
    if mode in ("token", "disabled"):
        return mode == "token"
    if response.status_code == 404 and _json_field(_get(f"{address}/api/version", address), "ray_version"):
        return False  # Ray < 2.52: no token authentication
    raise DashboardError(
        f"{address} answered HTTP {response.status_code} but is not a Ray dashboard "
        f"(GET /api/authentication_mode). {HOW_TO_REACH}"
    )


def load_token(environ: Mapping[str, str], home: Path) -> AuthToken | None:
    """The token as Ray reads it: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` (which must then
    exist and be non-empty), else ``<home>/.ray/auth_token``; ``None`` when there is none.

    Raises:
        DashboardError: ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file (Ray treats it as fatal too).
    """
    value = environ.get(TOKEN_ENV, "").strip()
    if value:
        return AuthToken(TOKEN_ENV, value)
    named = environ.get(TOKEN_PATH_ENV, "")
    if named:
        path = Path(named).expanduser()
        value = _read_token_file(path)
        if not value:
            raise DashboardError(f"{TOKEN_PATH_ENV}={named}: the file does not exist, cannot be read or is empty.")
        return AuthToken(f"{TOKEN_PATH_ENV} ({path})", value)
    path = home / ".ray" / "auth_token"
    value = _read_token_file(path)
    return AuthToken(str(path), value) if value else None


def required_token(address: str, environ: Mapping[str, str], home: Path) -> AuthToken:
    """:func:`load_token`, for a cluster that asks for one.

    Raises:
        DashboardError: no token is configured (the message says where to put it).
    """
    token = load_token(environ, home)
    if token is None:
        raise DashboardError(
            f"the Ray cluster at {address} requires token authentication and no token was found. {HOW_TO_GET_A_TOKEN}"
        )
    return token


def _get(url: str, address: str) -> requests.Response:
    """GET ``url`` with the connect/read timeouts; a failure to connect is a :class:`DashboardError`."""
    import requests

    try:
        return requests.get(url, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.exceptions.Timeout as exc:
        raise DashboardError(
            f"no answer from the Ray dashboard at {address} ({type(exc).__name__}). {HOW_TO_REACH}"
        ) from None
    except requests.exceptions.RequestException as exc:
        reason = _short_reason(exc)
        raise DashboardError(f"cannot reach the Ray dashboard at {address}: {reason}. {HOW_TO_REACH}") from None


def _json_field(response: requests.Response, key: str) -> object:
    """``response.json()[key]`` of a 200 answer, else ``None``."""
    try:
        return response.json().get(key) if response.ok else None
    except (ValueError, AttributeError):
        return None


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _short_reason(exc: Exception) -> str:
    """``connection refused``, ``name or service not known``…: the innermost cause, without the URL dump."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__

"""Secrets out of everything the project prints, logs or stores: the one redaction of URLs, keys and configs.

Used for the console, MLflow params/tags/artifacts, the registered model's ``detector.json``, and the runtime
environment ``dhrcnn submit`` prints. What counts as a secret:

* a URL's password (``scheme://user:PASSWORD@host``) and the values of secret-looking query parameters
  (``?token=…``, ``access_token``, ``password``, ``secret``, ``signature``/``sig``, ``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``api_key``…): replaced by ``***``;
* a config key or environment variable whose name says secret, password, passwd, token, access key,
  credential, API key or private key (:func:`is_secret_key`): dropped from configs, shown as ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_KEY = re.compile(
    r"secret|password|passwd|token|access_?key|credential|api_?key|private_?key|signature|^sig$", re.I
)
# A password in the userinfo of anything URL-like inside a longer text (a command line, a message).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@", re.I)
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) config key, variable or query parameter name names a secret."""
    return bool(_SECRET_KEY.search(key))


def redact_url(text: str) -> str:
    """``text`` with every URL's password and secret query values replaced by ``***``; the rest unchanged."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: _redact_one(m.group(0)), _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", text))


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(is_secret_key(k) for k, _ in pairs):
        return url
    query = urlencode([(k, MASK if is_secret_key(k) else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))


def redact_value(name: str, value: str) -> str:
    """``value`` of variable or key ``name``, safe to print: ``***`` for a secret name, else :func:`redact_url`."""
    return MASK if is_secret_key(name) else redact_url(value)


def has_url_password(text: str) -> bool:
    """Whether ``text`` holds a URL with a password or a secret query value."""
    return redact_url(text) != text


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested config without secret keys, with URLs redacted (for YAML artifacts and MLflow)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if not is_secret_key(str(k))}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return redact_url(value)
        return value

    return clean(config)

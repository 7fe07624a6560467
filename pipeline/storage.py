"""One way to reach local paths and ``s3://`` URIs: pyarrow filesystems built from a :class:`StorageConfig`.

URIs are either local paths (``/data/coco``, ``data/coco``, ``file:///data/coco``) or ``s3://bucket/key``;
the same code path serves AWS S3, MinIO and the local moto server used by the tests.

Settings left ``None`` in :class:`StorageConfig` are read from the standard AWS variables when a filesystem is
built, on whichever process builds it: ``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL`` (a bare
``pyarrow.fs.S3FileSystem()`` ignores both, hence the explicit construction here), ``AWS_REGION`` then
``AWS_DEFAULT_REGION``, ``AWS_MAX_ATTEMPTS``; credentials come from the AWS SDK's default chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, instance roles).

Credentials never travel: they are hidden from ``repr``, dropped when a :class:`StorageConfig` (or a filesystem
returned by :func:`resolve`) is pickled into a Ray task, and re-read from the worker's environment there.
Credentials given explicitly in a config therefore reach only the process that holds that config; workers
need them in their own environment (or an instance role).

Every failure is a :class:`StorageError` subclass whose message names the URI and says what to do, never a
secret: :class:`ObjectNotFoundError`, :class:`BucketNotFoundError`, :class:`StorageAuthError`,
:class:`StorageUnreachableError`. Timeouts and a bounded retry strategy make an unreachable endpoint fail
within seconds (connection refused: < 1 s; no answer at all: about ``attempts x timeout``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.s3_handler import ExplicitCredentialsS3Handler

_S3 = "s3://"
_AUTH_CODES = frozenset(
    {
        "ACCESS_DENIED",
        "INVALID_ACCESS_KEY_ID",
        "SIGNATURE_DOES_NOT_MATCH",
        "UNRECOGNIZED_CLIENT",
        "INVALID_CLIENT_TOKEN_ID",
        "EXPIRED_TOKEN",
        "MISSING_AUTHENTICATION_TOKEN",
    }
)
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to do about it."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object (or local file) does not exist; its bucket does."""


class BucketNotFoundError(StorageError):
    """The bucket named in an ``s3://`` URI does not exist at the endpoint."""


class StorageAuthError(StorageError, PermissionError):
    """Credentials are wrong, expired or lack a permission (or a local file is not readable)."""


class StorageUnreachableError(StorageError, ConnectionError):
    """The S3 endpoint did not answer within the configured timeouts and retries."""


@dataclass(frozen=True)
class StorageConfig:
    """Where and how to reach object storage. ``None`` means "from the environment, when used".

    Attributes:
        endpoint_url: ``http(s)://host[:port]`` of an S3-compatible service (MinIO, moto); ``None`` for AWS
            or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
        region: signing region; ``None``: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1`` when
            an endpoint is set, else the AWS SDK's choice.
        access_key_id, secret_access_key, session_token: explicit credentials (hidden from ``repr``, never
            pickled); ``None``: the AWS SDK default chain.
        anonymous: unsigned requests (public buckets).
        connect_timeout_s: TCP connect timeout per attempt.
        request_timeout_s: a request fails when no byte arrives for this long.
        max_attempts: attempts per request (first try included); ``None``: ``AWS_MAX_ATTEMPTS`` or 3.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 10.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url, "StorageConfig.endpoint_url")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("StorageConfig: give both access_key_id and secret_access_key, or neither")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("StorageConfig: connect_timeout_s and request_timeout_s must be > 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"StorageConfig.max_attempts must be >= 1, got {self.max_attempts}")

    @property
    def has_explicit_credentials(self) -> bool:
        return self.access_key_id is not None

    def without_secrets(self) -> StorageConfig:
        """This config with the credentials cleared (they will come from the environment)."""
        return dataclasses.replace(self, access_key_id=None, secret_access_key=None, session_token=None)

    def __reduce__(self) -> tuple[type[StorageConfig], tuple[object, ...]]:
        # Pickling (Ray task arguments, closures) drops the secrets; the receiver reads its own environment.
        public = self.without_secrets()
        return (StorageConfig, tuple(getattr(public, f.name) for f in dataclasses.fields(public)))

    def __copy__(self) -> StorageConfig:
        return self  # immutable: copies inside one process keep the credentials

    def __deepcopy__(self, memo: dict[int, object]) -> StorageConfig:
        return self

    def endpoint(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The effective endpoint URL: the config's, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``."""
        env = os.environ if environ is None else environ
        value = self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if value is not None:
            _check_endpoint(value, "AWS_ENDPOINT_URL")
        return value

    def effective_region(self, environ: Mapping[str, str] | None = None) -> str | None:
        env = os.environ if environ is None else environ
        region = self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        if region is None and self.endpoint(env) is not None:
            region = "us-east-1"  # S3-compatible servers (MinIO, moto) sign with this by default
        return region

    def effective_max_attempts(self, environ: Mapping[str, str] | None = None) -> int:
        env = os.environ if environ is None else environ
        if self.max_attempts is not None:
            return self.max_attempts
        raw = env.get("AWS_MAX_ATTEMPTS", "")
        return int(raw) if raw.isdigit() and int(raw) >= 1 else 3

    def describe(self) -> str:
        """A one-line, secret-free summary for messages and logs."""
        endpoint = self.endpoint() or "AWS S3"
        if self.anonymous:
            creds = "anonymous"
        elif self.has_explicit_credentials:
            creds = "explicit credentials from the config"
        elif os.environ.get("AWS_ACCESS_KEY_ID"):
            creds = "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        else:
            creds = "credentials from the AWS default chain (~/.aws, instance role)"
        return f"endpoint {endpoint}, region {self.effective_region() or 'auto'}, {creds}"

    def build_s3(self) -> pafs.S3FileSystem:
        """A native ``S3FileSystem`` with these settings (explicit credentials included, if any)."""
        endpoint = self.endpoint()
        kwargs: dict[str, object] = {}
        if endpoint is not None:
            parts = urlsplit(endpoint)
            kwargs.update(scheme=parts.scheme, endpoint_override=parts.netloc)
        if self.has_explicit_credentials:
            kwargs.update(
                access_key=self.access_key_id, secret_key=self.secret_access_key, session_token=self.session_token
            )
        return pafs.S3FileSystem(
            anonymous=self.anonymous,
            region=self.effective_region(),
            connect_timeout=self.connect_timeout_s,
            request_timeout=self.request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.effective_max_attempts()),
            **kwargs,
        )


def _check_endpoint(value: str, source: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"{source} must look like http(s)://host[:port], got {value!r}")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (anything else with ``://`` except ``file://`` is rejected)."""
    return uri.startswith(_S3)


def _path_of(uri: str) -> str:
    """The filesystem path for ``uri``: ``bucket/key`` for S3, an absolute path for local files."""
    if is_s3(uri):
        rest = uri[len(_S3) :]
        path = rest.strip("/")
        if not path or rest.startswith("/"):
            raise StorageError(f"{uri}: an s3:// URI needs a bucket name, e.g. s3://my-bucket/coco", uri)
        return path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/key", uri)
    return os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str, config: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path for ``uri``.

    Returns ``(LocalFileSystem, absolute_path)`` or ``(S3 filesystem, "bucket/key")``. The filesystem can be
    passed to pyarrow and Ray Data (``read_parquet(..., filesystem=fs)``): it pickles without credentials. With
    explicit credentials in ``config`` it is a ``PyFileSystem`` wrapper around the native ``S3FileSystem``
    (whose own pickle would carry them); otherwise the native one, whose credentials come from the
    environment of the process using it.
    """
    config = config or StorageConfig()
    path = _path_of(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), path
    if config.has_explicit_credentials:
        return pafs.PyFileSystem(ExplicitCredentialsS3Handler(config)), path
    return config.build_s3(), path


def join(uri: str, *parts: str) -> str:
    """``uri`` and relative ``parts`` joined with ``/`` (``join("s3://b/x", "a", "f.jpg") == "s3://b/x/a/f.jpg"``).

    Raises ValueError for an absolute part; for untrusted names use :func:`pipeline.coco.safe_join`.
    """
    out = uri.rstrip("/") if uri.rstrip("/") else uri
    for part in parts:
        if part.startswith("/"):
            raise ValueError(f"join({uri!r}, ...): part {part!r} is absolute")
        part = part.rstrip("/")
        if part:
            out = f"{out}/{part}" if not out.endswith("/") else f"{out}{part}"
    return out


def read_bytes(uri: str, config: StorageConfig | None = None, *, filesystem: pafs.FileSystem | None = None) -> bytes:
    """The whole object at ``uri``. ``filesystem``: reuse one from :func:`resolve` for many reads."""
    fs, path = (filesystem, _path_of(uri)) if filesystem is not None else resolve(uri, config)
    with _errors(uri, "read", fs, config), fs.open_input_stream(path) as f:
        return f.read()


def read_chunks(uri: str, config: StorageConfig | None = None, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The object at ``uri`` as consecutive pieces of at most ``chunk_size`` bytes, for readers that must not
    hold the whole object (on S3 each piece is a ranged GET: keep them large)."""
    fs, path = resolve(uri, config)
    with _errors(uri, "read", fs, config), fs.open_input_stream(path) as f:
        while chunk := f.read(chunk_size):
            yield chunk


def read_many(
    uris: Sequence[str],
    config: StorageConfig | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    threads: int = 8,
) -> list[bytes | StorageError]:
    """The objects at ``uris`` (all on ``filesystem``, or each resolved), ``threads`` reads in flight; a read
    that fails with a :class:`StorageError` gives that error in its place, for the caller to raise or record."""

    def read(uri: str) -> bytes | StorageError:
        try:
            return read_bytes(uri, config, filesystem=filesystem)
        except StorageError as err:
            return err

    if not uris:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(read, uris))


def write_bytes(
    uri: str, data: bytes, config: StorageConfig | None = None, *, filesystem: pafs.FileSystem | None = None
) -> None:
    """Write ``data`` to ``uri``, atomically: S3 PUTs are; local files go through a temporary + rename."""
    fs, path = (filesystem, _path_of(uri)) if filesystem is not None else resolve(uri, config)
    with _errors(uri, "write", fs, config):
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def exists(uri: str, config: StorageConfig | None = None, *, filesystem: pafs.FileSystem | None = None) -> bool:
    """Whether an object (or a non-empty prefix / local directory) exists at ``uri``.

    A missing bucket is an error (:class:`BucketNotFoundError`), not ``False``: it is almost always a typo.
    """
    fs, path = (filesystem, _path_of(uri)) if filesystem is not None else resolve(uri, config)
    with _errors(uri, "check", fs, config):
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
    if not found and is_s3(uri):
        _require_bucket(uri, fs, config)
    return found


def list_files(
    uri_prefix: str,
    config: StorageConfig | None = None,
    suffixes: Sequence[str] | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> list[str]:
    """Sorted URIs of all files under ``uri_prefix`` (recursive), optionally only those ending in ``suffixes``
    (case-insensitive, e.g. ``(".jpg", ".png")``). A prefix with nothing under it gives ``[]``; a missing
    bucket raises :class:`BucketNotFoundError`."""
    fs, path = (filesystem, _path_of(uri_prefix)) if filesystem is not None else resolve(uri_prefix, config)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    with _errors(uri_prefix, "list", fs, config):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not infos and is_s3(uri_prefix):
        _require_bucket(uri_prefix, fs, config)
    base = uri_prefix.rstrip("/")
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or (wanted and not info.path.lower().endswith(wanted)):
            continue
        rel = info.path[len(path) :].lstrip("/")
        out.append(join(base, rel))
    return sorted(out)


def delete_tree(uri: str, config: StorageConfig | None = None, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Delete everything under ``uri`` (a local directory or an S3 prefix); nothing there is not an error."""
    fs, path = (filesystem, _path_of(uri)) if filesystem is not None else resolve(uri, config)
    if is_s3(uri) and "/" not in path:
        raise StorageError(f"{uri}: refusing to delete a whole bucket", uri)
    with _errors(uri, "delete", fs, config):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)


def as_storage_error(
    exc: BaseException, uri: str, action: str = "access", config: StorageConfig | None = None
) -> StorageError:
    """Translate a pyarrow/OS error raised while accessing ``uri`` into the matching :class:`StorageError`."""
    config = config or StorageConfig()
    text = _scrub(str(exc), config)
    code_match = re.search(r"AWS Error ([A-Z_]+)", text)
    code = code_match.group(1) if code_match else ""
    where = f" ({config.describe()})" if is_s3(uri) else ""
    if code in _AUTH_CODES or isinstance(exc, PermissionError):
        return StorageAuthError(
            f"{uri}: permission denied ({code or 'local file permissions'}){where}. Check AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY (or the storage config's credentials) and that they may {action} this "
            f"object. [{text}]",
            uri,
        )
    if code == "NO_SUCH_BUCKET":
        return _bucket_error(uri, config)
    if code == "NETWORK_CONNECTION" or "curlCode" in text:
        return StorageUnreachableError(
            f"{uri}: cannot reach the S3 endpoint{where} after {config.effective_max_attempts()} attempt(s) "
            f"(connect timeout {config.connect_timeout_s:g}s, request timeout {config.request_timeout_s:g}s). "
            f"Check AWS_ENDPOINT_URL and that the server is running and reachable. [{text}]",
            uri,
        )
    if isinstance(exc, FileNotFoundError) or code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND"):
        return ObjectNotFoundError(f"{uri}: no such file or object{where}. Check the path/URI. [{text}]", uri)
    return StorageError(f"{uri}: could not {action}{where}: {text}", uri)


def _bucket_error(uri: str, config: StorageConfig) -> BucketNotFoundError:
    bucket = _path_of(uri).split("/", 1)[0]
    return BucketNotFoundError(
        f"{uri}: bucket {bucket!r} does not exist ({config.describe()}). Fix the URI or create the bucket "
        f"(e.g. `aws s3 mb s3://{bucket}`).",
        uri,
    )


def _require_bucket(uri: str, fs: pafs.FileSystem, config: StorageConfig | None) -> None:
    bucket = _path_of(uri).split("/", 1)[0]
    with _errors(uri, "check the bucket of", fs, config):
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    if missing:
        raise _bucket_error(uri, config or StorageConfig())


@contextmanager
def _errors(uri: str, action: str, fs: pafs.FileSystem, config: StorageConfig | None) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        err = as_storage_error(exc, uri, action, config)
        if isinstance(err, ObjectNotFoundError) and is_s3(uri):
            _require_bucket(uri, fs, config)  # a missing bucket also reads as "not found"
        raise err from None


def _scrub(text: str, config: StorageConfig) -> str:
    secrets = [config.access_key_id, config.secret_access_key, config.session_token]
    secrets += [os.environ.get(name) for name in _SECRET_ENV]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text

"""One job per run directory: a lease held in the run directory for as long as the job runs on the driver.

A run directory (``run.storage_path``/``run.name``, local or ``s3://``) is a job's identity: Ray Train keeps its
checkpoints there and :mod:`jobs.train.job` its MLflow run id, resolved config, identity and result. Two jobs
started with one name and storage path would both write there, each resuming from and overwriting the other's
checkpoints and logging to one MLflow run. :func:`jobs.train.job.run_training` therefore holds a lease
(:data:`LEASE_FILE` in the run directory) from before it writes anything there until it returns or fails; a
second job is refused with :class:`LeaseHeldError`, whose message names the holder (host, pid, since when, until
when) and the ways out.

The lease is a small JSON object: ``owner`` (a random id), ``host``, ``pid``, ``started``, ``renewed``,
``expires`` (Unix seconds, plus the same times as UTC text for people). Every change is a compare-and-set
against the version that was read, so that of two starters exactly one wins:

* S3 (AWS, MinIO, moto >= 5.1): create is ``PutObject`` with ``If-None-Match: *``; renewal and takeover are
  ``PutObject`` with ``If-Match: <etag>``; release is ``DeleteObject`` with ``If-Match: <etag>``. A lost race
  answers 412 (``PreconditionFailed``; AWS may also answer 409 ``ConditionalRequestConflict``). Servers that
  ignore these headers cannot hold a lease safely; moto 5.2.6 and AWS S3 enforce them.
* Local paths: the same operations under ``flock`` on :data:`LOCK_FILE` beside the lease (released by the
  kernel when its process dies): create with ``O_CREAT | O_EXCL``, replace (a temporary file and
  ``os.replace``) and delete only when the content is still the one read.

Time to live and renewal: a lease expires :data:`TTL_S` (120 s) after its last renewal; a heartbeat thread renews
it every :data:`RENEW_EVERY_S` (30 s). A renewal that finds another owner's lease (someone took it over after
this job failed to renew for a whole TTL: a frozen driver, a network partition) marks the lease lost: the
holder is told on stderr, its main thread is interrupted if it took the lease there, and leaving the ``with``
raises :class:`LeaseLostError`. A renewal that fails for another reason (storage unreachable) is retried at the
next beat.

Takeover: a lease that expired (its holder died or lost its storage) is taken over by the next starter; on the
same host, a lease whose pid no longer exists is taken over at once (a killed driver started again right away
need not wait for the TTL). Expiry compares the holder's clock with the starter's: hosts' clocks must agree to
well within the TTL. Host names must tell the driver machines apart (on one host, a pid from another pid
namespace with the same host name would look dead).
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

from pipeline.storage import (
    BucketNotFoundError,
    StorageAuthError,
    StorageConfig,
    StorageError,
    StorageUnreachableError,
    is_s3,
    join,
)

LEASE_FILE = "lease.json"
LOCK_FILE = ".lease.lock"  # local storage only: the flock that makes each compare-and-set atomic
TTL_S = 120.0
RENEW_EVERY_S = 30.0
_LOST_RACE = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"})


class LeaseHeldError(RuntimeError):
    """Another live job holds the run directory's lease; the message names it and the ways out."""


class LeaseLostError(RuntimeError):
    """This job's lease was taken over by another job while it ran."""


class _Store(Protocol):
    """Compare-and-set on one object. A version is an opaque token of the content read or written last."""

    path: str

    def read(self) -> tuple[bytes, str] | None: ...
    def create(self, body: bytes) -> str | None: ...
    def replace(self, body: bytes, version: str) -> str | None: ...
    def delete(self, version: str) -> bool: ...


class RunLease:
    """The lease on ``run_dir``: ``with RunLease(run_dir, storage):`` holds it (see the module docstring).

    ``interrupt_main``: when the lease is lost, interrupt the main thread (``KeyboardInterrupt``) if the lease
    was taken there, so that a job that no longer owns its run directory stops writing to it.
    """

    def __init__(
        self,
        run_dir: str,
        storage: StorageConfig | None = None,
        *,
        ttl_s: float = TTL_S,
        renew_every_s: float = RENEW_EVERY_S,
        interrupt_main: bool = True,
    ) -> None:
        if not 0 < renew_every_s < ttl_s:
            raise ValueError(f"RunLease: renew_every_s ({renew_every_s}) must be > 0 and below ttl_s ({ttl_s})")
        self.run_dir = run_dir
        self.path = join(run_dir, LEASE_FILE)
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self.interrupt_main = interrupt_main
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._store: _Store = (
            _S3Store(self.path, storage or StorageConfig()) if is_s3(run_dir) else _LocalStore(self.path)
        )
        self._record: dict[str, Any] = {}
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_main = False

    # -- holding -------------------------------------------------------------------------------------------

    def acquire(self) -> RunLease:
        """Take the lease (create it, or take over an expired or dead holder's); raise :class:`LeaseHeldError`
        while another job holds it."""
        self._record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(3):  # a lease released or taken over between our read and our write: look again
            now = time.time()
            body = self._body(now)
            version = self._store.create(body)
            if version is None:
                found = self._store.read()
                if found is None:
                    continue
                theirs = _parse(found[0])
                if theirs.get("owner") == self.owner:  # our own create, retried after its answer was lost
                    version = found[1]
                elif holder_alive(theirs, now):
                    raise LeaseHeldError(self._held_message(theirs))
                else:
                    version = self._store.replace(body, found[1])
                    if version is None:
                        continue
                    print(f"{self.path}: took over the lease of {_describe(theirs, now)}", file=sys.stderr, flush=True)
            self._version = version
            self._start_heartbeat()
            return self
        found = self._store.read()
        raise LeaseHeldError(self._held_message(_parse(found[0]) if found else {}))

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this job's (a failed delete is only reported:
        the lease then expires after its TTL)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            version, self._version = self._version, None
        if version is None or self.lost:
            return
        try:
            self._store.delete(version)
        except (StorageError, OSError) as err:
            print(f"{self.path}: could not release the lease ({err}); it expires by itself", file=sys.stderr)

    def renew(self) -> bool:
        """Extend the lease by its TTL; ``False`` (and :attr:`lost` set) when another job holds it now. Storage
        errors propagate (the heartbeat retries)."""
        with self._lock:
            if self._version is None or self.lost:
                return False
            version = self._store.replace(self._body(time.time()), self._version)
            if version is None:
                found = self._store.read()  # our own write, retried after its answer was lost, is still ours
                if found is None or _parse(found[0]).get("owner") != self.owner:
                    self.lost = True
                    return False
                version = found[1]
            self._version = version
            return True

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        if self.lost:  # however the job ended (Ray Train's SIGINT handler exits with SystemExit)
            raise LeaseLostError(
                f"{self.path}: this job's lease was taken over by another job while it ran (it could not renew "
                f"it for {self.ttl_s:g} s); that job now writes to {self.run_dir}. Check which job should own it."
            ) from exc

    # -- heartbeat -----------------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._in_main = threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.owner[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                if self.renew():
                    continue
            except (StorageError, OSError) as err:  # storage away for a moment: retry at the next beat
                print(f"{self.path}: could not renew the lease, will retry: {err}", file=sys.stderr, flush=True)
                continue
            print(
                f"{self.path}: this job's lease was taken over by another job; stopping this one (it must not "
                f"write to {self.run_dir} any more).",
                file=sys.stderr,
                flush=True,
            )
            if self.interrupt_main and self._in_main:
                _thread.interrupt_main()
            return

    # -- content -------------------------------------------------------------------------------------------

    def _body(self, now: float) -> bytes:
        record = {**self._record, "renewed": now, "expires": now + self.ttl_s}
        for key in ("started", "renewed", "expires"):
            record[f"{key}_utc"] = _utc(record[key])
        return json.dumps(record, indent=1, sort_keys=True).encode()

    def _held_message(self, theirs: dict[str, Any]) -> str:
        expires = _utc(float(theirs.get("expires", 0.0)))
        return (
            f"{self.run_dir} is in use by another job: {_describe(theirs, time.time())}. Two jobs with one run.name "
            "and run.storage_path would overwrite each other's checkpoints and MLflow run. Wait for that job to end, "
            f"or give this job another run.name (or run.storage_path). If that job is dead, its lease expires at "
            f"{expires} unless renewed (then starting this job again takes it over), or remove {self.path} by hand."
        )


def holder_alive(record: dict[str, Any], now: float) -> bool:
    """Whether the lease ``record`` still counts: not expired, and on this host its pid still exists. A record
    that cannot be read (no owner) counts as dead."""
    if not record.get("owner") or float(record.get("expires", 0.0)) <= now:
        return False
    if record.get("host") == socket.gethostname():
        return _pid_exists(int(record.get("pid", -1)))
    return True


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _parse(body: bytes) -> dict[str, Any]:
    try:
        record = json.loads(body)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(record: dict[str, Any], now: float) -> str:
    if not record.get("owner"):
        return "a lease that cannot be read"
    expires = float(record.get("expires", 0.0))
    until = f"until {_utc(expires)}" if expires > now else f"expired {_utc(expires)}"
    return (
        f"pid {record.get('pid')} on {record.get('host')}, running since {_utc(float(record.get('started', 0.0)))}, "
        f"lease renewed {_utc(float(record.get('renewed', 0.0)))}, valid {until}"
    )


# -- storage --------------------------------------------------------------------------------------------------


class _LocalStore:
    """Compare-and-set on a local file: every operation under ``flock`` of :data:`LOCK_FILE`; the version is the
    file's content."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock_path = os.path.join(os.path.dirname(self.path), LOCK_FILE)

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _current(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write_tmp(self, body: bytes) -> str:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            body = self._current()
        return None if body is None else (body, body.hex())

    def create(self, body: bytes) -> str | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:  # a holder killed mid-write leaves a lease that reads as dead
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
        return body.hex()

    def replace(self, body: bytes, version: str) -> str | None:
        with self._locked():
            current = self._current()
            if current is None or current.hex() != version:
                return None
            os.replace(self._write_tmp(body), self.path)
        return body.hex()

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._current()
            if current is None or current.hex() != version:
                return False
            os.remove(self.path)
        return True


class _S3Store:
    """Compare-and-set on an S3 object with conditional requests (boto3: pyarrow cannot send them); the version
    is the object's ETag."""

    def __init__(self, uri: str, config: StorageConfig) -> None:
        self.path = uri
        self._config = config
        self._bucket, _, self._key = uri[len("s3://") :].partition("/")
        self._client = _s3_client(config)

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any] | None:
        """The response, or ``None`` when a condition failed (or the object is gone)."""
        import botocore.exceptions as bce

        try:
            return getattr(self._client, method)(Bucket=self._bucket, Key=self._key, **kwargs)
        except bce.ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code == "NoSuchBucket":
                raise BucketNotFoundError(f"{self.path}: bucket {self._bucket!r} does not exist", self.path) from None
            if code in _LOST_RACE or status in _LOST_RACE:
                return None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                raise StorageAuthError(
                    f"{self.path}: permission denied ({code}, {self._config.describe()}): the lease needs "
                    "s3:GetObject, s3:PutObject and s3:DeleteObject on the run directory",
                    self.path,
                ) from None
            raise StorageError(
                f"{self.path}: lease {method} failed ({self._config.describe()}): {err}", self.path
            ) from None
        except bce.BotoCoreError as err:  # endpoint unreachable, timeouts
            raise StorageUnreachableError(f"{self.path}: {err} ({self._config.describe()})", self.path) from None

    def read(self) -> tuple[bytes, str] | None:
        response = self._call("get_object")
        return None if response is None else (response["Body"].read(), response["ETag"])

    def create(self, body: bytes) -> str | None:
        response = self._call("put_object", Body=body, IfNoneMatch="*", ContentType="application/json")
        return None if response is None else response["ETag"]

    def replace(self, body: bytes, version: str) -> str | None:
        response = self._call("put_object", Body=body, IfMatch=version, ContentType="application/json")
        return None if response is None else response["ETag"]

    def delete(self, version: str) -> bool:
        try:
            return self._call("delete_object", IfMatch=version) is not None
        except StorageError as err:  # a server without conditional deletes: check, then delete
            if "NotImplemented" not in str(err):
                raise
        found = self.read()
        return found is not None and found[1] == version and self._call("delete_object") is not None


def _s3_client(config: StorageConfig) -> Any:
    """A boto3 S3 client with ``config``'s endpoint, region, credentials, timeouts and attempts."""
    import boto3
    import botocore
    import botocore.config

    settings = botocore.config.Config(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.request_timeout_s,
        retries={"max_attempts": config.effective_max_attempts(), "mode": "standard"},
        signature_version=botocore.UNSIGNED if config.anonymous else None,
    )
    credentials = {}
    if config.has_explicit_credentials:
        credentials = {
            "aws_access_key_id": config.access_key_id,
            "aws_secret_access_key": config.secret_access_key,
            "aws_session_token": config.session_token,
        }
    return boto3.session.Session().client(
        "s3", endpoint_url=config.endpoint(), region_name=config.effective_region(), config=settings, **credentials
    )

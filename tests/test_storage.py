"""pipeline.storage against the local filesystem and a real S3-protocol server (moto, auth enforced)."""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.local_s3 import S3Server, free_port
from pipeline import storage
from pipeline.storage import (
    BucketNotFoundError,
    ObjectNotFoundError,
    StorageAuthError,
    StorageConfig,
    StorageError,
    StorageUnreachableError,
)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_exists_list_roundtrip(root: str) -> None:
    storage.write_bytes(storage.join(root, "a", "x.jpg"), b"jpeg bytes")
    storage.write_bytes(storage.join(root, "a", "b", "y.PNG"), b"png")
    storage.write_bytes(storage.join(root, "notes.txt"), b"")

    assert storage.read_bytes(storage.join(root, "a", "x.jpg")) == b"jpeg bytes"
    assert storage.read_bytes(storage.join(root, "notes.txt")) == b""
    assert storage.exists(storage.join(root, "a", "x.jpg"))
    assert storage.exists(storage.join(root, "a"))  # a prefix / directory
    assert not storage.exists(storage.join(root, "a", "nope.jpg"))
    assert storage.list_files(root) == [
        storage.join(root, "a", "b", "y.PNG"),
        storage.join(root, "a", "x.jpg"),
        storage.join(root, "notes.txt"),
    ]
    assert storage.list_files(root, suffixes=(".jpg", ".png")) == [
        storage.join(root, "a", "b", "y.PNG"),
        storage.join(root, "a", "x.jpg"),
    ]
    assert storage.list_files(storage.join(root, "empty-prefix")) == []

    storage.write_bytes(storage.join(root, "a", "x.jpg"), b"replaced")
    assert storage.read_bytes(storage.join(root, "a", "x.jpg")) == b"replaced"
    storage.delete_tree(storage.join(root, "a"))
    assert storage.list_files(root) == [storage.join(root, "notes.txt")]
    storage.delete_tree(storage.join(root, "a"))  # nothing there: not an error


def test_read_many_keeps_order_and_returns_errors_in_place(root: str) -> None:
    uris = [storage.join(root, f"{i}.bin") for i in range(12)]
    for i, uri in enumerate(uris):
        if i != 5:
            storage.write_bytes(uri, bytes([i]) * i)
    fs, _ = storage.resolve(root)
    got = storage.read_many(uris, filesystem=fs, threads=4)
    assert [g for i, g in enumerate(got) if i != 5] == [bytes([i]) * i for i in range(12) if i != 5]
    assert isinstance(got[5], ObjectNotFoundError) and got[5].uri == uris[5]
    assert storage.read_many([]) == []


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "manifest.json"
    storage.write_bytes(str(target), b"{}")
    storage.write_bytes(f"file://{target}", b'{"v": 2}')
    assert target.read_bytes() == b'{"v": 2}'
    assert os.listdir(target.parent) == ["manifest.json"]


def test_join_and_resolve() -> None:
    assert storage.join("s3://b/x/", "a", "f.jpg") == "s3://b/x/a/f.jpg"
    assert storage.join("s3://b", "a/") == "s3://b/a"
    assert storage.join("/data", "", "c") == "/data/c"
    with pytest.raises(ValueError, match="absolute"):
        storage.join("s3://b", "/etc/passwd")
    fs, path = storage.resolve("s3://bucket/key/x.json", StorageConfig(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/key/x.json"
    fs, path = storage.resolve("rel/x.json")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("rel/x.json")
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.resolve("s3:///x")


def test_settings_come_from_the_standard_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    cfg = StorageConfig()
    assert cfg.endpoint() is None and cfg.effective_max_attempts() == 3
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert cfg.endpoint() == "http://generic:9000"
    assert cfg.effective_region() == "us-east-1"  # the S3-compatible default when an endpoint is set
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3-specific:9443")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert cfg.endpoint() == "https://s3-specific:9443" and cfg.effective_region() == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    assert cfg.effective_region() == "eu-central-1" and cfg.effective_max_attempts() == 5
    explicit = StorageConfig(endpoint_url="http://mine:1", region="ap-south-1", max_attempts=1)
    assert (explicit.endpoint(), explicit.effective_region(), explicit.effective_max_attempts()) == (
        "http://mine:1",
        "ap-south-1",
        1,
    )
    fs, _ = storage.resolve("s3://b/k", cfg)
    assert fs.region == "eu-central-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    with pytest.raises(ValueError, match="http"):
        storage.resolve("s3://b/k")
    with pytest.raises(ValueError, match="both"):
        StorageConfig(access_key_id="only-the-key")


def test_secrets_never_in_repr_or_pickles(s3_server: S3Server) -> None:
    cfg = StorageConfig(
        endpoint_url=s3_server.endpoint_url,
        access_key_id="AKIAEXPLICITKEY",
        secret_access_key="explicit-secret-value",
        session_token="explicit-session-token",
    )
    for text in (repr(cfg), str(cfg), cfg.describe()):
        assert "explicit-secret-value" not in text and "AKIAEXPLICITKEY" not in text
    blob = pickle.dumps(cfg)
    for secret in (b"explicit-secret-value", b"AKIAEXPLICITKEY", b"explicit-session-token"):
        assert secret not in blob
    restored = pickle.loads(blob)
    assert restored == cfg.without_secrets() and restored.endpoint_url == s3_server.endpoint_url
    fs, _ = storage.resolve("s3://b/k", cfg)  # explicit credentials: the pickle-safe wrapper
    assert b"explicit-secret-value" not in pickle.dumps(fs)


def _read_in_fresh_process(blob: bytes, uri: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Unpickle ``(config, filesystem)`` in another process, as a Ray worker would, and read ``uri`` with both."""
    code = (
        "import pickle, sys\n"
        "from pipeline import storage\n"
        "cfg, fs = pickle.loads(sys.stdin.buffer.read())\n"
        f"a = storage.read_bytes({uri!r}, cfg)\n"
        f"b = storage.read_bytes({uri!r}, filesystem=fs)\n"
        "print(a.decode(), b.decode())\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **env}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-c", code], input=blob, capture_output=True, env=env, timeout=60, check=False
    )


def test_unpickled_config_reads_credentials_from_the_receiving_environment(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"{s3_bucket}/obj.txt"
    storage.write_bytes(uri, b"payload")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cfg = StorageConfig(access_key_id=s3_env.access_key_id, secret_access_key=s3_env.secret_access_key)
    assert storage.read_bytes(uri, cfg) == b"payload"  # explicit credentials work here...
    blob = pickle.dumps((cfg, storage.resolve(uri, cfg)[0]))
    assert s3_env.secret_access_key.encode() not in blob

    worker = _read_in_fresh_process(blob, uri, s3_env.env)  # ...a worker uses its own environment
    assert worker.returncode == 0, worker.stderr.decode()[-2000:]
    assert worker.stdout.decode().split() == ["payload", "payload"]

    no_creds = {k: v for k, v in s3_env.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    worker = _read_in_fresh_process(blob, uri, no_creds)  # and nothing travelled with the pickle
    assert worker.returncode != 0  # (moto answers unsigned requests with 403 or 500)
    assert re.search(r"pipeline\.storage\.Storage\w*Error: s3://", worker.stderr.decode())


def test_missing_object(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=f"{s3_bucket}/nope/x.json: no such file"):
        storage.read_bytes(f"{s3_bucket}/nope/x.json")
    with pytest.raises(ObjectNotFoundError, match="no such file") as info:
        storage.read_bytes(str(tmp_path / "x.json"))
    assert isinstance(info.value, FileNotFoundError) and info.value.uri == str(tmp_path / "x.json")


@pytest.mark.parametrize("op", ["read", "write", "exists", "list"])
def test_bucket_that_does_not_exist(s3_env: S3Server, op: str) -> None:
    uri = "s3://no-such-bucket-dhrcnn/a/b.json"
    call = {
        "read": lambda: storage.read_bytes(uri),
        "write": lambda: storage.write_bytes(uri, b"x"),
        "exists": lambda: storage.exists(uri),
        "list": lambda: storage.list_files("s3://no-such-bucket-dhrcnn/a"),
    }[op]
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket-dhrcnn' does not exist") as info:
        call()
    assert "aws s3 mb s3://no-such-bucket-dhrcnn" in str(info.value)


@pytest.mark.parametrize("which", ["secret", "key"])
@pytest.mark.parametrize("op", ["read", "write", "list"])
def test_wrong_credentials(s3_env: S3Server, s3_bucket: str, which: str, op: str) -> None:
    uri = f"{s3_bucket}/data/x.bin"
    storage.write_bytes(uri, b"x")
    key = s3_env.access_key_id if which == "secret" else "AKIADOESNOTEXIST0000"
    bad = StorageConfig(access_key_id=key, secret_access_key="wrong-secret-123456")
    call = {
        "read": lambda: storage.read_bytes(uri, bad),
        "write": lambda: storage.write_bytes(uri, b"y", bad),
        "list": lambda: storage.list_files(f"{s3_bucket}/data", bad),
    }[op]
    with pytest.raises(StorageAuthError, match="permission denied") as info:
        call()
    message = str(info.value)
    assert uri.rsplit("/", 1)[0] in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "wrong-secret-123456" not in message and s3_env.secret_access_key not in message
    assert storage.read_bytes(uri) == b"x"  # nothing was overwritten


def test_unreachable_endpoint_fails_within_seconds(s3_env: S3Server) -> None:
    refused = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError, match="cannot reach the S3 endpoint") as info:
        storage.read_bytes("s3://bucket/x.json", refused)
    assert time.monotonic() - start < 10
    assert "s3://bucket/x.json" in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)


def test_silent_endpoint_times_out(s3_env: S3Server) -> None:
    """A server that accepts connections but never answers: bounded by request timeout x attempts."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", request_timeout_s=1.0, max_attempts=2)
        start = time.monotonic()
        with pytest.raises(StorageUnreachableError, match="after 2 attempt"):
            storage.exists("s3://bucket/x.json", cfg)
        assert time.monotonic() - start < 8

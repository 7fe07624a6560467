"""A local S3-compatible server: moto's server mode in a subprocess, for the quickstart (``--s3``), the local
stack (``infra/local/s3_server.py``), the tests and the benchmarks.

A development server: in memory, bound to 127.0.0.1 by default. Without ``enforce_auth`` it accepts any
credentials; with it, it checks them as AWS does: an IAM user with an allow-all policy is created, its key pair
becomes the server's credentials, and from then on requests signed with any other key or secret are refused
(``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``AccessDenied``). The code that uses it talks to it through
pyarrow's S3 client exactly as it would to AWS S3 or MinIO; boto3 is used here only to set the server up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.storage import StorageConfig

ANY_KEY = "dhrcnn-local"  # not a secret: before authentication is enforced the server accepts any key
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto server: ``endpoint_url``, the ``env`` that points AWS clients (and ``pipeline.storage``)
    at it, ``stop()``."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    process: subprocess.Popen[bytes] = field(repr=False)
    region: str = REGION

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def storage_config(self) -> StorageConfig:
        """Endpoint and region; the credentials come from :attr:`env` (never stored in a config)."""
        return StorageConfig(endpoint_url=self.endpoint_url, region=self.region)

    def client(self, service: str = "s3") -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its ``s3://name`` URI."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_s3_server(
    port: int | None = None, *, host: str = "127.0.0.1", enforce_auth: bool = False, timeout_s: float = 60.0
) -> S3Server:
    """Start ``python -m moto.server`` and wait until it answers; stop it with :meth:`S3Server.stop`.

    The server's request log goes to a temporary file (a pipe nobody reads would fill up and stall it); its
    tail is in the error if the server does not come up. AWS variables of this process are not passed on.
    """
    port = port or free_port(host)
    endpoint = f"http://{host}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with tempfile.TemporaryFile() as log:  # the child keeps its own descriptor after this closes
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            _wait_until_up(endpoint, proc, log, timeout_s)
            server = S3Server(endpoint, ANY_KEY, ANY_KEY, proc)
            return _enable_auth(server) if enforce_auth else server
        except BaseException:
            proc.kill()
            proc.wait(timeout=10)
            raise


def export_env(server: S3Server) -> None:
    """Point this process (and Ray workers started after it) at ``server``."""
    os.environ.update(server.env)


def _wait_until_up(endpoint: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited with code {proc.returncode}: {log.read()[-2000:].decode()}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise TimeoutError(f"moto server at {endpoint} did not answer within {timeout_s:g}s")


def _enable_auth(server: S3Server) -> S3Server:
    iam = server.client("iam")
    iam.create_user(UserName="dhrcnn-local")
    key = iam.create_access_key(UserName="dhrcnn-local")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="dhrcnn-local", PolicyName="allow-all", PolicyDocument=json.dumps(policy))
    # From now on every request must be signed with an IAM key (moto's INITIAL_NO_AUTH_ACTION_COUNT = 0).
    req = urllib.request.Request(
        f"{server.endpoint_url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(req, timeout=10):
        pass
    return S3Server(server.endpoint_url, key["AccessKeyId"], key["SecretAccessKey"], server.process)

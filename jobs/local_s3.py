"""A local S3-compatible server (moto's server mode) for the quickstart and the local stack.

A development server: in memory, bound to 127.0.0.1, any credentials accepted. Needs ``moto[server]``
(in the ``test`` extra). ``infra/local/s3_server.py`` runs one from the command line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pipeline.storage import StorageConfig

ACCESS_KEY = "dhrcnn-local"  # not a secret: the development server accepts any key
SECRET_KEY = "dhrcnn-local-secret"
REGION = "us-east-1"


@dataclass
class LocalS3:
    """A running server: ``endpoint_url``, the ``env`` that points AWS clients at it, ``stop()``."""

    endpoint_url: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    @property
    def storage_config(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.endpoint_url, region=REGION)

    def create_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_s3(port: int | None = None, host: str = "127.0.0.1", timeout_s: float = 60.0) -> LocalS3:
    """Start ``python -m moto.server`` and wait until it answers."""
    port = port or free_port(host)
    endpoint = f"http://{host}:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # moto logs every request; an undrained pipe would stall it
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the moto server exited with code {process.returncode} (is moto[server] installed?)")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return LocalS3(endpoint, process)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the S3 server at {endpoint} did not answer within {timeout_s:g}s")


def export_env(server: LocalS3) -> None:
    """Point this process (and Ray workers started after it) at ``server``."""
    os.environ.update(server.env)

"""Shared fixtures.

S3 (self-contained): ``s3_server`` is one real moto S3 server per session (see ``tests/s3_server.py``);
``s3_env`` points the standard AWS variables at it for one test; ``s3_bucket`` is a fresh bucket URI.
Ray workers inherit the environment at ``ray.init`` time: set the server's ``env`` before starting Ray.
Ray: ``ray_4_cpus`` is a local Ray of 4 logical CPUs for one test module (Ray Train workers + Ray Data tasks
on a 2-core machine).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3_server import S3Server, start_s3_server


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Two shared cores: one intra-op thread is several times faster than two fighting ones."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ray_4_cpus() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The AWS variables of ``os.environ`` pointed at ``s3_server`` for one test (others cleared)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A new, empty bucket on ``s3_server`` (``s3://test-<random>``), with ``s3_env`` active."""
    return s3_env.create_bucket()

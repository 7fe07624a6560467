"""Shared fixtures.

S3 (self-contained): ``s3_server`` is one real moto S3 server per session with authentication enforced (the
project's launcher, ``jobs/local_s3.py``); ``s3_env`` points the standard AWS variables at it for one test;
``s3_bucket`` is a fresh bucket URI.
Ray workers inherit the environment at ``ray.init`` time: set the server's ``env`` before starting Ray.
Ray: ``ray_cluster`` is one local Ray of 4 logical CPUs (Ray Train workers + Ray Data tasks on a 2-core
machine) for the whole session, started at its first use with the AWS variables of ``s3_server`` in the
environment: Ray's workers inherit them at ``ray.init``, and they stay set in this process until the session
ends, so that driver-side code and workers reach the same server. ``synth_dataset`` is one small prepared
synthetic dataset (15 images: 12 train, 3 val) shared by the training and tuning tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.denormals import flush_denormals
from jobs.local_s3 import S3Server, start_s3_server

# Ray starts its worker processes at niceness 15 (``RAY_worker_niceness``). Beside normal-priority CPU load
# (the two busy processes of the loaded test runs) they then get almost no CPU: measured 3 % each for two Ray
# Train workers against 75 % for each busy loop, and a 65 s quickstart test took 26 min. The tests run Ray's
# workers at the niceness of the test process itself, so that they measure this project's code, not Ray's
# scheduling priority; every Ray the tests start (in-process or in a subprocess) gets this variable.
RAY_TEST_ENV = {"RAY_worker_niceness": "0"}


@pytest.fixture(scope="session", autouse=True)
def _ray_workers_at_normal_priority() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_TEST_ENV.items():
            env.setenv(name, value)
        yield


@pytest.fixture(scope="session", autouse=True)
def _flush_denormals() -> None:
    """As every process that runs the detector on CPU does (``jobs/denormals.py``): subnormal floats in the box
    head's backward pass made train steps several times slower."""
    flush_denormals()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Two shared cores: one intra-op thread is several times faster than two fighting ones."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[S3Server]:
    """One local Ray for every test that needs one (starting Ray costs 5-10 s on 2 cores)."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        for name, value in s3_server.env.items():
            env.setenv(name, value)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield s3_server
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server(enforce_auth=True)
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


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory, ray_cluster: S3Server) -> Path:
    """``<root>/parquet/{train,val}``: 15 synthetic 128x96 images, prepared once per session."""
    from tests.synthetic_data import prepared_synth

    return prepared_synth(tmp_path_factory.mktemp("synth"), 15)

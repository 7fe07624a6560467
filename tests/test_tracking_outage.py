"""Tracking off the critical path: a real ``mlflow server`` is stopped for longer than the client's retries and
started again while a :class:`~jobs.mlflow.buffered.BufferedTracker` keeps logging; nothing waits on it, a warning
says so, and every metric and artifact is in MLflow afterwards."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.local_s3 import free_port
from jobs.mlflow.buffered import BufferedTracker
from jobs.mlflow.tracking import Tracker, TrackingConfig, ensure_tracking_store
from tests.test_tracking import _stop_group, _wait_for


def _server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    with (folder / "server.log").open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:g} s")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_mlflow_outage_blocks_nothing_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries: none, so the outage shows
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _server(tmp_path, port)
    try:
        _wait_for(f"{url}/health", server, tmp_path / "server.log", timeout_s=120)
        cfg = ensure_tracking_store(TrackingConfig(tracking_uri=url, experiment_name="outage"))
        warnings: list[str] = []
        tracker = BufferedTracker(Tracker(cfg), warn=warnings.append, pause_s=0.5, max_pause_s=2.0)
        run_id = tracker.start()
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        assert tracker.flush(60)

        _stop_group(server)  # the outage
        for step in range(2, 6):
            tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
        picture = tmp_path / "val_predictions.png"
        picture.write_bytes(b"not really a png")
        tracker.log_artifact(picture, "eval/step_0000005")
        picture.unlink()  # a temporary file, gone before MLflow is back: the tracker kept a copy
        _until(lambda: any("does not answer" in w for w in warnings), 60, "no outage warning")
        assert tracker.pending == 5, "every call is kept while MLflow is down"

        server = _server(tmp_path, port)  # back, same store
        _wait_for(f"{url}/health", server, tmp_path / "server.log", timeout_s=120)
        assert tracker.flush(120)
        tracker.end("FINISHED")
        assert any("answers again" in w for w in warnings)

        client = MlflowClient(url)
        history = client.get_metric_history(run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 6)]
        assert [a.path for a in client.list_artifacts(run_id, "eval/step_0000005")] == [
            "eval/step_0000005/val_predictions.png"
        ]
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if server.poll() is None:
            _stop_group(server)

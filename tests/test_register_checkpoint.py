"""``dhrcnn models register``: a training checkpoint logged and registered as the end of training does it, into the
job's MLflow run, once per run; and the export's failure, which names the saved weights and that command.

The checkpoints are written by hand from the seeded ``tiny`` detector (no Ray, no data): the trainer's state
layout (``model``, ``hooks``) and a run directory with ``config.yaml`` and ``mlflow_run_id`` as a job leaves them."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow import MlflowClient

from jobs.cli import main
from jobs.config import resolve_job_config
from jobs.mlflow.buffered import BufferedTracker
from jobs.mlflow.pyfunc_model import file_sha256, load_detector, torch_detector
from jobs.mlflow.registry import list_models, pull
from jobs.mlflow.tracking import Tracker, TrackingConfig, ensure_tracking_store
from jobs.train.checkpoint import save_state
from jobs.train.export import ExportError, ExportModel
from jobs.train.register import register_checkpoint
from model.build import build_model
from model.config import model_config
from pipeline.categories import CategoryMap

CATEGORIES = CategoryMap.from_pairs([(1, "circle"), (3, "square"), (7, "triangle")])

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]


def _job_dict(tmp_path: Path, uri: str, name: str | None) -> dict:
    return {
        "model": {"preset": "tiny", "num_classes": 3},
        "data": {
            "train": {"parquet": str(tmp_path / "no-data")},  # never read: the checkpoint holds the category map
            "augment": {"resize": {"train_min_sizes": [96], "test_min_size": 96, "max_size": 128}},
        },
        "tracking": {"tracking_uri": uri, "experiment_name": "register", "registered_model_name": name},
        "run": {"name": "job", "storage_path": str(tmp_path / "runs")},
    }


def _state(seed: int, run_id: str | None, ap: float) -> dict:
    torch.manual_seed(seed)
    detector = build_model(model_config("tiny", CATEGORIES.num_classes))
    hooks = {"ExportModel": {"categories": CATEGORIES.to_dict()}, "EvaluationHook": {"last_ap": ap, "best_ap": ap}}
    if run_id is not None:
        hooks["MetricLogger"] = {"mlflow_run_id": run_id}
    return {"model": detector.state_dict(), "hooks": hooks}


@pytest.fixture
def job_run(tmp_path: Path):
    """A finished job's run directory: config.yaml, mlflow_run_id, two Ray Train checkpoints (the second newer);
    its MLflow run in a sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = ensure_tracking_store(TrackingConfig(tracking_uri=uri, experiment_name="register"))
    tracker = Tracker(cfg)
    run_id = tracker.start()
    tracker.end("FINISHED")
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_job_dict(tmp_path, uri, "dh-reg")))
    (run_dir / "mlflow_run_id").write_text(run_id)
    for i, name in enumerate(("checkpoint_2026-12-08_00-00-02.000000", "checkpoint_2026-12-08_00-00-01.000000")):
        (run_dir / name).mkdir()
        save_state(run_dir / name, _state(seed=i, run_id=run_id, ap=0.1 * (i + 1)))
        os.utime(run_dir / name / "state.pt", (time.time() - 100 + i, time.time() - 100 + i))
    return SimpleNamespace(uri=uri, run_id=run_id, run_dir=run_dir, latest=run_dir / name)


def test_register_a_run_directory_once_into_its_run(job_run, tmp_path: Path, capsys) -> None:
    assert main(["models", "register", "--checkpoint", str(job_run.run_dir)]) == 0
    assert "registered version 1" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=job_run.uri, registry_uri=job_run.uri)
    version = client.get_model_version("dh-reg", "1")
    assert version.run_id == job_run.run_id, "the registry points at the job's run"
    assert version.tags["AP"] == "0.2", "the most recent checkpoint's AP"
    assert client.get_run(job_run.run_id).info.status == "FINISHED", "the job's run is left as it was"

    folder = pull("models:/dh-reg/1", tmp_path / "pulled", tracking_uri=job_run.uri)  # checks the sha256
    assert file_sha256(folder / "artifacts" / "weights.pt") == version.tags["weights_sha256"]
    detector = torch_detector(load_detector("models:/dh-reg@champion", tracking_uri=job_run.uri))
    expected = torch.load(job_run.latest / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in expected.items())

    again = register_checkpoint(str(job_run.latest / "state.pt"), "dh-reg", tracking_uri=job_run.uri)
    assert again[1] == "1" and [r.version for r in list_models("dh-reg", tracking_uri=job_run.uri)] == ["1"]


def test_missing_checkpoint_or_config_names_the_path(job_run, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert main(["models", "register", "--checkpoint", str(missing), "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert f"no checkpoint at {missing}" in err and "run directory" in err

    lone = tmp_path / "lone" / "checkpoint_1"
    shutil.copytree(job_run.latest, lone)
    assert main(["models", "register", "--checkpoint", str(lone), "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert f"no job config at {lone.parent / 'config.yaml'}" in err and "--config" in err


def test_a_failed_registration_says_where_the_weights_are_and_how_to_register_them(
    job_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = "http://user:s3cret@127.0.0.1:9"  # nothing listens on port 9
    job = resolve_job_config(_job_dict(tmp_path, down, "dh-reg"))
    tracker = Tracker(job.tracking)
    tracker._client, tracker._run_id = MlflowClient(tracking_uri=down), job_run.run_id  # as if MLflow just went down
    state = _state(seed=5, run_id=job_run.run_id, ap=0.4)
    detector = build_model(model_config("tiny", CATEGORIES.num_classes))
    detector.load_state_dict(state["model"])
    trainer = SimpleNamespace(module=detector, metrics={"val/AP": 0.4}, state_dict=lambda: state)
    export = ExportModel(job, CATEGORIES, BufferedTracker(tracker), rank=0, run_dir=str(job_run.run_dir))

    with pytest.raises(ExportError) as failed:
        export.after_train(trainer)
    saved = job_run.run_dir / "unregistered_model"
    message = str(failed.value)
    assert f"saved in {saved}" in message and "s3cret" not in message
    assert f"dhrcnn models register --checkpoint {saved} --name dh-reg" in message

    # the command it gives, with MLflow back (the run directory's config names the sqlite store)
    command = message.split("register them with:\n", 1)[1].split()
    assert main(command[1:]) == 0
    assert [r.ap for r in list_models("dh-reg", tracking_uri=job_run.uri)] == [0.4]

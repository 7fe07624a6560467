"""``dhrcnn tune`` on Ray Tune + Ray Train V2 (2 CPU cores): a two-trial sweep of the ``tiny`` preset on small
synthetic data, where ASHA stops the worse trial after its first epoch; nested MLflow runs; the best model
registered once; the same sweep started again is restored from its Tune experiment without rerunning trials."""

from __future__ import annotations

import mlflow
import pytest

from jobs.tune.config import SweepConfig, resolve_sweep_config
from jobs.tune.sweep import TAG_SWEEP, run_sweep, trial_run_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MODEL_NAME = "dh-tune"


@pytest.fixture(scope="module")
def dataset(synth_dataset):
    return synth_dataset


def make_sweep(dataset, tmp_path) -> SweepConfig:
    """Two trials in a fixed order (a grid) from the same initial weights: a useful learning rate first, then
    one too small to learn, which ASHA (grace period 1 epoch, reduction factor 2) stops at epoch 1 because its
    loss there is above the first trial's. Ranked by ``train/loss`` here: on a dozen images the tiny detector's
    val/AP is still 0 for both after an epoch, and ties never stop a trial."""
    raw = {
        "model": {"preset": "tiny", "num_classes": 3},
        "data": {
            "train": {"parquet": str(dataset / "parquet" / "train")},
            "val": {"parquet": str(dataset / "parquet" / "val")},
            "batch_size": 2,
            "eval_batch_size": 4,
            "augment": {"resize": {"train_min_sizes": [96], "test_min_size": 96, "max_size": 128}},
        },
        "train": {
            "epochs": 2,
            "base_lr": 0.04,
            "warmup_iters": 2,
            "steps": [2],
            "grad_clip_norm": 10.0,
            "log_every_iters": 2,
            "keep_best": 1,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": MODEL_NAME},
        "run": {"name": "sweep", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "tune": {
            "num_samples": 1,
            "metric": "train/loss",
            "mode": "min",
            "max_concurrent_trials": 1,
            "scheduler": {"grace_period": 1, "reduction_factor": 2},
            "trial_cpus": 0.25,
            "space": {"train.base_lr": {"grid": [0.04, 1.0e-7]}, "model.roi_head.ext_lambda_fc": {"choice": [0.7]}},
        },
    }
    return resolve_sweep_config(raw)


def test_sweep_stops_early_nests_runs_registers_best_and_resumes(dataset, tmp_path):
    sweep = make_sweep(dataset, tmp_path)
    result = run_sweep(sweep)

    rows = {row.params["train.base_lr"]: row for row in result.rows}
    assert len(result.rows) == 2
    good, bad = rows[0.04], rows[1.0e-7]
    assert (good.status, good.epochs) == ("completed", 2), good
    assert (bad.status, bad.epochs) == ("stopped early", 1), (bad, good)
    assert bad.value is not None and good.value is not None and "val/AP" in bad.metrics
    assert result.best == good and result.model_uri == f"models:/{MODEL_NAME}/1"

    uri = sweep.job.tracking.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(sweep.job.tracking.experiment_name)
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 3, "one parent run and one run per trial"
    parent = runs[result.parent_run_id]
    assert parent.data.tags[TAG_SWEEP] == "sweep" and parent.info.status == "FINISHED"
    for row in result.rows:
        trial = runs[row.run_id]
        assert trial.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert trial.info.run_name == trial_run_name("sweep", row.trial_id)
        assert trial.data.params["train.base_lr"] == str(row.params["train.base_lr"])
        assert trial.data.params["train.eval_every_epochs"] == "1"
    assert runs[good.run_id].info.status == "FINISHED" and runs[bad.run_id].info.status == "KILLED"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert client.get_model_version(MODEL_NAME, "1").run_id == good.run_id
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "tune")}
    assert {"tune/results.md", "tune/results.json", "tune/best_config.yaml"} <= artifacts
    ap_history = [(m.step, m.value) for m in client.get_metric_history(good.run_id, "val/AP")]

    again = run_sweep(make_sweep(dataset, tmp_path))  # same name and storage: the Tune experiment is restored
    assert [(r.trial_id, r.status, r.epochs) for r in again.rows] == [
        (r.trial_id, r.status, r.epochs) for r in result.rows
    ]
    assert again.parent_run_id == result.parent_run_id and again.model_uri == result.model_uri
    assert len(client.search_runs([experiment.experiment_id])) == 3, "no trial ran again"
    assert [(m.step, m.value) for m in client.get_metric_history(good.run_id, "val/AP")] == ap_history
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1, "registered once"

"""The training job on Ray Train (2 CPU cores): resume after a stop, recovery from a killed worker, NaN
handling, and one MLflow run per job. Small synthetic data, the ``tiny`` detector, short schedules."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from jobs.config import JobConfig, resolve_job_config
from jobs.train.job import run_training
from jobs.train.loop import NonFiniteLossError
from jobs.train.schedule import lr_factor, scaled_lr

pytestmark = pytest.mark.timeout(900)
NUM_TRAIN = 12  # the session's 15 synthetic images, 20 % to val


@pytest.fixture(scope="module")
def dataset(synth_dataset):
    return synth_dataset


def make_job(dataset, tmp_path, name: str, **train) -> JobConfig:
    raw = {
        "model": {"preset": "tiny", "num_classes": 3},
        "data": {
            "train": {"parquet": str(dataset / "parquet" / "train")},
            "val": {"parquet": str(dataset / "parquet" / "val")},
            "batch_size": 2,
            "augment": {"resize": {"train_min_sizes": [96], "test_min_size": 96, "max_size": 128}},
        },
        "train": {
            "epochs": 2,
            "base_lr": 0.04,
            "warmup_iters": 4,
            "steps": [2],
            "grad_clip_norm": 10.0,
            "log_every_iters": 1,
            "checkpoint_every_iters": 4,
            **train,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": None},
        "run": {"name": name, "storage_path": str(tmp_path / "runs"), "max_failures": 0},
    }
    return resolve_job_config(raw)


def mlflow_runs(job: JobConfig):
    uri = job.tracking.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(job.tracking.experiment_name)
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_resume_continues_at_checkpoint_iteration_with_scheduled_lr(dataset, tmp_path):
    job = make_job(dataset, tmp_path, "resume", fail_at_iter=5)  # dies after the checkpoint at iteration 4
    with pytest.raises(Exception) as failure:  # the worker's os._exit surfaces as a Ray Train error
        run_training(job)
    client, runs = mlflow_runs(job)
    assert len(runs) == 1, f"the first run failed before its MLflow run existed: {failure.value!r}"
    run_id = runs[0].info.run_id
    logged_before = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert logged_before, f"the first run failed before training (not the injected exit): {failure.value!r}"
    assert max(logged_before) == 5  # iterations 1..5 logged, 5 never checkpointed

    result = run_training(make_job(dataset, tmp_path, "resume"))  # same name and storage: resumes
    _, runs = mlflow_runs(job)
    assert len(runs) == 1 and result.run_id == run_id
    iters_per_epoch = NUM_TRAIN // 2
    assert result.metrics["iteration"] == 2 * iters_per_epoch
    assert [m.step for m in client.get_metric_history(run_id, "train/resumed_from_iter")] == [4]
    history = client.get_metric_history(run_id, "train/lr")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), "a resumed run must not log a step twice"
    base = scaled_lr(job.train, total_batch_size=2)
    for m in history:
        assert m.value == pytest.approx(base * lr_factor(m.step, job.train, iters_per_epoch), rel=1e-6), m.step


@pytest.mark.slow
def test_nan_steps_are_skipped_and_counted(dataset, tmp_path):
    job = make_job(dataset, tmp_path, "nan-skip", epochs=1, nan_at_iters=[2, 3])
    result = run_training(job)
    assert result.metrics["train/skipped_nan_steps"] == 2.0
    assert result.metrics["iteration"] == NUM_TRAIN // 2


@pytest.mark.slow
def test_consecutive_nans_stop_the_job_and_keep_the_checkpoint(dataset, tmp_path):
    job = make_job(dataset, tmp_path, "nan-stop", epochs=1, nan_at_iters=[4, 5, 6], max_consecutive_nan=2)
    with pytest.raises(Exception, match="consecutive non-finite losses") as err:
        run_training(job)
    assert isinstance(err.value, NonFiniteLossError) or "NonFiniteLossError" in str(err.value)
    checkpoints = list((tmp_path / "runs" / "nan-stop").glob("checkpoint_*"))
    assert checkpoints, "the last good checkpoint (iteration 4) must be kept"


@pytest.mark.slow
def test_killed_worker_recovers_from_its_checkpoint_and_matches_an_uninterrupted_run(dataset, tmp_path):
    """Tolerance: Ray Data hands blocks to the two workers in completion order, so the two runs see the same
    images in a different order; the last epoch's mean loss agrees within 50 % and val AP within 0.1."""
    scaling = {"num_workers": 2, "cpus_per_worker": 0.5}

    def job(name: str, **train) -> JobConfig:
        raw = make_job(dataset, tmp_path / name, name, epochs=2, seed=7, **train).to_dict()
        return resolve_job_config({**raw, "scaling": scaling, "run": {**raw["run"], "max_failures": 1}})

    faulty = job("faulty", fail_at_iter=5)  # checkpoint at iteration 4, dies before iteration 6
    got, ref = run_training(faulty), run_training(job("clean"))
    client, runs = mlflow_runs(faulty)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    iters_per_epoch = NUM_TRAIN // 2 // 2
    assert got.metrics["iteration"] == ref.metrics["iteration"] == 2 * iters_per_epoch
    resumed = client.get_metric_history(got.run_id, "train/resumed_from_iter")
    assert [(m.step, m.value) for m in resumed] == [(4, 4.0)], "the new worker group restores iteration 4"
    history = client.get_metric_history(got.run_id, "train/lr")
    assert sorted(m.step for m in history) == list(range(1, 2 * iters_per_epoch + 1))
    base = scaled_lr(faulty.train, total_batch_size=4)
    for m in history:  # the scheduler continues where the checkpoint left it
        assert m.value == pytest.approx(base * lr_factor(m.step, faulty.train, iters_per_epoch), rel=1e-6), m.step

    def last_epoch_loss(job: JobConfig, run_id: str) -> float:
        client, _ = mlflow_runs(job)
        losses = [m.value for m in client.get_metric_history(run_id, "train/loss") if m.step > iters_per_epoch]
        assert len(losses) == iters_per_epoch
        return sum(losses) / len(losses)

    clean_loss = last_epoch_loss(job("clean"), ref.run_id)
    assert last_epoch_loss(faulty, got.run_id) == pytest.approx(clean_loss, rel=0.5)
    assert got.metrics["val/AP"] == pytest.approx(ref.metrics["val/AP"], abs=0.1)


def test_registered_model_evaluates_to_the_training_ap(dataset, tmp_path):
    from jobs.config import DatasetSpec
    from jobs.evaluate.model_eval import evaluate_model, load_for_eval
    from pipeline.storage import StorageConfig

    job = make_job(dataset, tmp_path, "registered", epochs=1)
    job = resolve_job_config(
        {**job.to_dict(), "tracking": {**job.to_dict()["tracking"], "registered_model_name": "dh-test"}}
    )
    result = run_training(job)
    assert result.metrics["model_uri"] == "models:/dh-test/1"
    uri = job.tracking.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("dh-test", "champion").version) == "1"
    run = client.get_run(result.run_id)
    assert "val/AP" in run.data.metrics and "data.storage.secret_access_key" not in run.data.params
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert artifacts, "evaluation plots are logged"
    beside_run = yaml.safe_load((tmp_path / "runs" / "registered" / "config.yaml").read_text())
    logged = yaml.safe_load(Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))).read_text())
    assert beside_run == logged and resolve_job_config(beside_run).model == job.model

    detector = load_for_eval("models:/dh-test@champion", tracking_uri=uri)
    metrics, _ = evaluate_model(detector, DatasetSpec(parquet=str(dataset / "parquet" / "val")), StorageConfig())
    assert metrics.stats["AP"] == pytest.approx(result.metrics["val/AP"], abs=1e-9)

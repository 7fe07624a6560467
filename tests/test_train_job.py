"""The training job on Ray Train (2 CPU cores): resume after a stop, recovery from a killed worker, NaN
handling, and one MLflow run per job. Small synthetic data, the ``tiny`` detector, short schedules."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from jobs.config import JobConfig, resolve_job_config
from jobs.train.job import run_training
from jobs.train.optim_step import NonFiniteLossError
from jobs.train.preflight import PreflightError
from jobs.train.schedule import lr_factor, scaled_lr
from tests.train_hooks import (
    NonFiniteImages,
    RecordBatches,
    RecordWeights,
    StopForKill,
    kill_when_checkpointed,
    read_records,
    register,
)

register()  # the hooks reach the Ray workers by value

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


def killed_at(iteration: int, tmp_path: Path, run_dir: Path, after_checkpoint: int):
    """The hook and the killer thread of one injected failure: rank 0 stops before the step that follows
    ``iteration`` steps and is SIGKILLed once the checkpoint of ``after_checkpoint`` is registered."""
    pid_file = tmp_path / f"worker-{run_dir.name}.pid"
    return StopForKill(iteration, pid_file), kill_when_checkpointed(pid_file, run_dir, after_checkpoint)


@pytest.mark.slow
def test_resume_continues_at_checkpoint_iteration_with_scheduled_lr(dataset, tmp_path):
    job = make_job(dataset, tmp_path, "resume")
    stop, killer = killed_at(5, tmp_path, tmp_path / "runs" / "resume", after_checkpoint=4)
    with pytest.raises(Exception) as failure:  # the killed worker surfaces as a Ray Train error (no retries)
        run_training(job, hooks=[stop])
    killer.join(timeout=5)
    client, runs = mlflow_runs(job)
    assert len(runs) == 1, f"the first run failed before its MLflow run existed: {failure.value!r}"
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FAILED"
    logged_before = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert logged_before, f"the first run failed before training (not the injected kill): {failure.value!r}"
    assert max(logged_before) == 5  # iterations 1..5 logged, 5 never checkpointed

    result = run_training(job, hooks=[stop])  # same name and storage: resumes (the pid file exists: no stop)
    _, runs = mlflow_runs(job)
    assert len(runs) == 1 and result.run_id == run_id and runs[0].info.status == "FINISHED"
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
    job = make_job(dataset, tmp_path, "nan-skip", epochs=1)
    result = run_training(job, hooks=[NonFiniteImages((2, 3))])  # the 3rd and 4th steps
    assert result.metrics["train/skipped_nan_steps"] == 2.0
    assert result.metrics["iteration"] == NUM_TRAIN // 2
    client, runs = mlflow_runs(job)
    losses = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert sorted(losses) == [1, 2, 5, 6], "the logged loss leaves the skipped steps out"
    assert all(math.isfinite(v) for v in losses.values())
    checkpointed = sorted(
        torch.load(path, weights_only=True)["progress"]["iteration"]
        for path in (tmp_path / "runs" / "nan-skip").glob("checkpoint_*/state.pt")
    )
    assert checkpointed == [6], "no checkpoint at iteration 4: the non-finite streak was still open there"


@pytest.mark.slow
def test_consecutive_nans_stop_the_job_once_and_keep_the_checkpoint(dataset, tmp_path):
    """A non-finite stop is not retried (``max_failures: 2``): the restarted worker groups find the fatal record
    and fail at once instead of replaying the training since the checkpoint."""
    raw = make_job(dataset, tmp_path, "nan-stop", epochs=1, max_consecutive_nan=2).to_dict()
    job = resolve_job_config({**raw, "run": {**raw["run"], "max_failures": 2}})
    record = tmp_path / "weights.jsonl"
    with pytest.raises(Exception, match="consecutive steps with a non-finite") as err:
        run_training(job, hooks=[NonFiniteImages((4, 5)), RecordWeights(record)])  # the 5th and 6th steps
    assert isinstance(err.value, NonFiniteLossError) or "NonFiniteLossError" in str(err.value)
    assert "not retried" in str(err.value)
    assert [r["iteration"] for r in read_records(record) if r["event"] == "start"] == [0], "trained once"
    checkpoints = list((tmp_path / "runs" / "nan-stop").glob("checkpoint_*/state.pt"))
    assert checkpoints, "the last good checkpoint (iteration 4) must be kept"
    _, runs = mlflow_runs(job)
    assert runs[0].info.status == "FAILED"


@pytest.mark.slow
def test_killed_worker_is_replaced_and_resumes_from_its_checkpoint_exactly(dataset, tmp_path):
    """Two workers; rank 0 is SIGKILLed before its 6th step (mid-epoch 2), after the checkpoint of iteration 4. The
    new worker group starts from exactly the weights of that checkpoint, logs into the same MLflow run, its LR
    schedule continues where the checkpoint left it, every rank trains on the batches an uninterrupted run trains
    on (the interrupted epoch's images included), and the run ends with that run's weights, bit for bit."""

    def two_workers(name: str) -> JobConfig:
        raw = make_job(dataset, tmp_path, name, epochs=2, seed=7).to_dict()
        scaling = {"num_workers": 2, "cpus_per_worker": 0.5}
        return resolve_job_config({**raw, "scaling": scaling, "run": {**raw["run"], "max_failures": 1}})

    job = two_workers("faulty")
    stop, killer = killed_at(5, tmp_path, tmp_path / "runs" / "faulty", after_checkpoint=4)
    record, batches = tmp_path / "weights.jsonl", tmp_path / "batches.jsonl"
    got = run_training(job, hooks=[stop, RecordWeights(record), RecordBatches(batches)])
    killer.join(timeout=5)

    client, runs = mlflow_runs(job)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    iters_per_epoch = NUM_TRAIN // 2 // 2
    assert got.metrics["iteration"] == 2 * iters_per_epoch
    records = read_records(record)
    starts = [r for r in records if r["event"] == "start"]
    assert [r["iteration"] for r in starts] == [0, 4], "one restart, from the checkpoint of iteration 4"
    checkpointed = next(r for r in records if r["event"] == "step" and r["iteration"] == 4)
    assert starts[1]["digest"] == checkpointed["digest"], "the new worker group restores the checkpoint's weights"
    resumed = client.get_metric_history(got.run_id, "train/resumed_from_iter")
    assert [(m.step, m.value) for m in resumed] == [(4, 4.0)]
    history = client.get_metric_history(got.run_id, "train/lr")
    assert sorted(m.step for m in history) == list(range(1, 2 * iters_per_epoch + 1))
    base = scaled_lr(job.train, total_batch_size=4)
    for m in history:  # the scheduler continues where the checkpoint left it
        assert m.value == pytest.approx(base * lr_factor(m.step, job.train, iters_per_epoch), rel=1e-6), m.step
    assert 0.0 <= got.metrics["val/AP"] <= 1.0

    clean_record, clean_batches = tmp_path / "clean-weights.jsonl", tmp_path / "clean-batches.jsonl"
    run_training(two_workers("clean"), hooks=[RecordWeights(clean_record), RecordBatches(clean_batches)])
    trained = {(r["rank"], r["iteration"]): r["images"] for r in read_records(batches)}  # a redone step: its last
    clean = {(r["rank"], r["iteration"]): r["images"] for r in read_records(clean_batches)}
    assert len(read_records(batches)) == len(clean) + 2, "the killed group's 5th step is redone on both ranks"
    assert trained == clean, "every rank trains on the batches of an uninterrupted run"
    interrupted = [i for (_, it), ids in trained.items() if it > iters_per_epoch for i in ids]
    assert sorted(interrupted) == sorted(i for (_, it), ids in clean.items() if it > iters_per_epoch for i in ids)
    final = [r["digest"] for r in read_records(record) if r["event"] == "step"][-1]
    assert final == [r["digest"] for r in read_records(clean_record) if r["event"] == "step"][-1]


def test_a_class_mismatch_is_refused_before_any_worker_starts(dataset, tmp_path):
    raw = make_job(dataset, tmp_path, "mismatch").to_dict()
    job = resolve_job_config({**raw, "model": {**raw["model"], "num_classes": 5}})
    with pytest.raises(PreflightError, match=r"model.num_classes is 5 but data.train has 3 categories"):
        run_training(job)
    assert not (tmp_path / "runs" / "mismatch").exists(), "nothing started, nothing written"
    assert not (tmp_path / "mlflow.db").exists()


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
    val_loss = {k: v for k, v in run.data.metrics.items() if k.startswith("val/loss")}
    assert {"val/loss", "val/loss_rpn_cls", "val/loss_rpn_bbox", "val/loss_cls", "val/loss_bbox"} <= set(val_loss)
    assert all(math.isfinite(v) and v >= 0 for v in val_loss.values())
    parts = sum(v for k, v in val_loss.items() if k != "val/loss")
    assert val_loss["val/loss"] == pytest.approx(parts, rel=1e-6), "val/loss is the sum of its terms"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert artifacts, "evaluation plots are logged"
    beside_run = yaml.safe_load((tmp_path / "runs" / "registered" / "config.yaml").read_text())
    logged = yaml.safe_load(Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))).read_text())
    assert beside_run == logged and resolve_job_config(beside_run).model == job.model

    again = run_training(job)  # a finished job started again: its result, nothing reopened or registered
    assert again.run_id == result.run_id and again.metrics["val/AP"] == result.metrics["val/AP"]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert [str(v.version) for v in client.search_model_versions("name='dh-test'")] == ["1"]

    detector = load_for_eval("models:/dh-test@champion", tracking_uri=uri)
    metrics, _ = evaluate_model(detector, DatasetSpec(parquet=str(dataset / "parquet" / "val")), StorageConfig())
    assert metrics.stats["AP"] == pytest.approx(result.metrics["val/AP"], abs=1e-9)

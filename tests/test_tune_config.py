"""The ``tune:`` section (no Ray): distributions, dotted keys checked against the job, errors naming the key,
trial jobs, and the results table."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.cli import main
from jobs.tune.config import Distribution, load_sweep_config, resolve_sweep_config, trial_job, with_values
from jobs.tune.results import best_row, results_table, trial_row
from model.typed_config import ConfigError
from pipeline.storage import StorageConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tune_tiny_synth.yaml"


def raw_sweep(**tune) -> dict:
    return {
        "model": {"preset": "tiny", "num_classes": 3},
        "data": {"train": {"parquet": "/data/train"}, "val": {"parquet": "/data/val"}},
        "train": {"epochs": 4},
        "run": {"name": "sw", "storage_path": "/runs"},
        "tune": {"space": {"train.base_lr": {"loguniform": [0.01, 0.1]}}, **tune},
    }


def test_the_example_config_resolves():
    sweep = load_sweep_config(CONFIG)
    assert sweep.tune.space["train.base_lr"] == Distribution(loguniform=(0.02, 0.16))
    assert sweep.tune.space["train.warmup_iters"].kind == "randint"
    assert sweep.job.run.name == "tiny_synth_sweep" and sweep.tune.scheduler.grace_period == 1


def test_space_values_and_kinds():
    raw = raw_sweep()
    raw["tune"]["space"] = {
        "train.base_lr": {"loguniform": [0.01, 0.1]},
        "train.weight_decay": {"choice": [0.0001, 0.0005]},
        "train.warmup_iters": {"randint": [10, 100]},
        "model.roi_head.reg_roi_scale_factor": {"uniform": [1.1, 1.5]},
        "model.roi_head.ext_lambda_conv": {"grid": [0.6, 0.8]},
        "train.steps": {"choice": [[2, 3], [3]]},
    }
    sweep = resolve_sweep_config(raw)
    kinds = {k: d.kind for k, d in sweep.tune.space.items()}
    assert kinds == {
        "train.base_lr": "loguniform",
        "train.weight_decay": "choice",
        "train.warmup_iters": "randint",
        "model.roi_head.reg_roi_scale_factor": "uniform",
        "model.roi_head.ext_lambda_conv": "grid",
        "train.steps": "choice",
    }
    assert sweep.tune.to_dict()["space"]["train.warmup_iters"] == {"randint": [10, 100]}
    assert sweep.tune.num_samples == 4 and sweep.tune.metric == "val/AP" and sweep.tune.mode == "max"


def test_nested_space_and_dotted_overrides_are_the_same_keys():
    sweep = resolve_sweep_config(raw_sweep(), ["tune.space.train.momentum.uniform=[0.8, 0.95]", "tune.num_samples=2"])
    assert set(sweep.tune.space) == {"train.base_lr", "train.momentum"} and sweep.tune.num_samples == 2


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.base_lrr": {"uniform": [0.1, 0.2]}}, r"tune\.space\.train\.base_lrr: .*unknown key train\.base_lrr"),
        ({"model.roi_head.hed": {"choice": ["fc"]}}, r"tune\.space\.model\.roi_head\.hed: .*unknown key"),
        ({"train.base_lr": {"normal": [0.1, 0.2]}}, r"tune\.space\.train\.base_lr\.normal: expected a distribution"),
        ({"train.base_lr": 0.1}, r"tune\.space\.train\.base_lr: expected a distribution"),
        ({"train.base_lr": {"uniform": [0.2, 0.1]}}, r"tune\.space\.train\.base_lr: uniform: expected low < high"),
        ({"train.base_lr": {"uniform": [0.1, 0.2, 0.3]}}, r"tune\.space\.train\.base_lr\.uniform: expected 2 values"),
        ({"train.base_lr": {"loguniform": [0.0, 0.1]}}, r"tune\.space\.train\.base_lr: loguniform: expected low > 0"),
        ({"train.base_lr": {"choice": []}}, r"tune\.space\.train\.base_lr: choice: expected at least one value"),
        ({"train.base_lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, r"tune\.space\.train\.base_lr: expected exactly"),
        ({"train.weight_decay": {"choice": ["1e-4"]}}, r"tune\.space\.train\.weight_decay: choice value '1e-4'"),
        ({"model.roi_head.ext_lambda_fc": {"uniform": [0.5, 1.5]}}, r"ext_lambda_fc: .*1\.5 is rejected.*\[0, 1\]"),
        ({"model.roi_head.reg_roi_scale_factor": {"uniform": [0.0, 1.3]}}, r"reg_roi_scale_factor: .*must be > 0"),
        ({"train.warmup_iters": {"randint": [1.5, 9]}}, r"tune\.space\.train\.warmup_iters\.randint\[0\]"),
        ({"train.base_lr.x": {"uniform": [0.1, 0.2]}}, r"tune\.space\.train\.base_lr\.x: .*base_lr is a value"),
        ({"run.name": {"choice": ["a", "b"]}}, r"tune\.space\.run\.name: not searchable"),
        ({"scaling.num_workers": {"choice": [1, 2]}}, r"tune\.space\.scaling\.num_workers: not searchable"),
        ({"train.epochs": {"choice": [1, 2]}}, r"tune\.space\.train\.epochs: not searchable"),
        ({}, r"tune: space: expected at least one key"),
    ],
)
def test_bad_space_raises_naming_the_key(space, message):
    raw = raw_sweep()
    raw["tune"]["space"] = space
    with pytest.raises(ConfigError, match=message):
        resolve_sweep_config(raw)


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"num_samples": 0}, r"tune: num_samples and max_concurrent_trials: expected >= 1"),
        ({"mode": "maximum"}, r"tune\.mode: expected one of 'max', 'min'"),
        ({"scheduler": {"reduction_factor": 1}}, r"tune\.scheduler: reduction_factor: expected > 1"),
        ({"scheduler": {"grace_period": 5}}, r"tune\.scheduler\.grace_period: 5 is beyond train\.epochs \(4\)"),
        ({"scheduler": {"time_attr": "epoch"}}, r"unknown key tune\.scheduler\.time_attr"),
        ({"trial_cpus": 0}, r"tune: trial_cpus: expected > 0"),
        ({"searcher": "hyperopt"}, r"unknown key tune\.searcher"),
    ],
)
def test_bad_tune_settings_raise_naming_the_key(tune, message):
    with pytest.raises(ConfigError, match=message):
        resolve_sweep_config(raw_sweep(**tune))


def test_a_sweep_needs_a_tune_section():
    raw = raw_sweep()
    del raw["tune"]
    with pytest.raises(ConfigError, match="missing required key tune"):
        resolve_sweep_config(raw)


def test_trial_job_applies_values_and_the_sweep_settings():
    raw = raw_sweep()
    raw["tracking"] = {"registered_model_name": "sweep-model", "run_name": "parent"}
    raw["train"] = {"epochs": 4, "eval_every_epochs": 2}
    sweep = resolve_sweep_config(raw)
    params = {"train.base_lr": 0.05, "model.roi_head.reg_roi_scale_factor": 1.4, "train.steps": [2, 3]}
    job = trial_job(sweep, params, "sw-abc_00001", "/runs/sw/trials")
    assert job.train.base_lr == 0.05 and job.train.steps == (2, 3) and job.model.roi_head.reg_roi_scale_factor == 1.4
    assert job.train.eval_every_epochs == 1, "ASHA compares trials at every epoch"
    assert job.tracking.registered_model_name is None and job.tracking.run_name is None
    assert (job.run.name, job.run.storage_path) == ("sw-abc_00001", "/runs/sw/trials")
    assert job.model.backbone == sweep.job.model.backbone and job.data == sweep.job.data


def test_with_values_keeps_explicit_credentials():
    sweep = resolve_sweep_config(raw_sweep())
    storage = StorageConfig(endpoint_url="http://localhost:9000", access_key_id="AK", secret_access_key="SK")
    from dataclasses import replace

    job = replace(sweep.job, data=replace(sweep.job.data, storage=storage))
    assert with_values(job, {"train.base_lr": 0.03}).data.storage.secret_access_key == "SK"


def _result(trial_id, lr, epoch, ap, model_uri=None, error=None, done=True):
    metrics = {"trial_id": trial_id, "epoch": epoch, "val/AP": ap, "iteration": 8 * epoch, "done": done}
    if model_uri:
        metrics["model_uri"] = model_uri
    return SimpleNamespace(metrics=metrics, config={"train.base_lr": lr}, error=error)


def test_rows_best_and_table():
    sweep = resolve_sweep_config(raw_sweep())
    rows = [
        trial_row(_result("t_00000", 0.05, 4, 0.31, "models:/m-a"), sweep, "run-a"),
        trial_row(_result("t_00001", 0.01, 1, 0.02), sweep, "run-b"),
        trial_row(_result("t_00002", 0.08, 4, 0.35, "models:/m-c"), sweep, "run-c"),
        trial_row(_result("t_00003", 0.09, 2, 0.5, error=RuntimeError("boom")), sweep, None),
        trial_row(_result("t_00004", 0.07, 2, 0.6, done=False), sweep, "run-e"),
    ]
    assert [r.status for r in rows] == ["completed", "stopped early", "completed", "error", "unfinished"]
    assert rows[1].model_uri is None and rows[3].error == "boom"
    assert best_row(rows, "max") is rows[2] and best_row(rows, "min") is rows[0]
    assert best_row(rows[1:2], "max") is None, "a trial stopped early has no final model"
    table = results_table(rows, ["train.base_lr"], "val/AP").splitlines()
    assert table[0] == "| trial | train.base_lr | val/AP | epochs | status |"
    assert table[3] == "| t_00001 | 0.01 | 0.02 | 1 | stopped early |"
    by_loss = results_table(rows[:1], ["train.base_lr"], "train/loss").splitlines()
    assert by_loss[0] == "| trial | train.base_lr | train/loss | val/AP | epochs | status |"
    assert by_loss[2] == "| t_00000 | 0.05 | - | 0.31 | 4 | completed |"


def test_cli_dry_run_prints_the_resolved_sweep(capsys):
    assert main(["tune", "--config", str(CONFIG), "--dry-run", "tune.num_samples=3"]) == 0
    out = capsys.readouterr().out
    assert "num_samples: 3" in out and "train.base_lr:" in out and "loguniform:" in out

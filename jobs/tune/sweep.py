"""A Ray Tune sweep over the training job (``dhrcnn tune``), on Ray Train V2.

Tune runs a function trainable, :func:`train_trial`, once per trial: it builds the trial's job (the base job
with the sampled values, see :func:`jobs.tune.config.trial_job`) and fits it with
:func:`jobs.train.job.run_training`, whose ``TorchTrainer`` forwards every ``ray.train.report`` of worker 0 to
Tune through ``TuneReportCallback``. ASHA stops trials on ``val/AP`` at the epochs of its rungs.

Names and storage, under ``run.storage_path``: the Tune experiment is ``<sweep>/`` (``run.name`` is the sweep
name), trial ``<id>``'s Ray Train run is ``<sweep>/trials/<sweep>-<id>``. Starting the same sweep again
restores the Tune experiment (``Tuner.restore``): finished and stopped trials are kept, unfinished and
errored ones start again and their Train runs resume from their latest checkpoints.

MLflow: one parent run for the sweep (its id kept in ``<sweep>/mlflow_run_id``), one run per trial nested
under it. Trials log their final model without registering it; the sweep registers the best completed
trial's model under ``tracking.registered_model_name`` (alias ``champion`` if it beats the champion), once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import ray.tune
import yaml
from mlflow import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from jobs.config import DatasetSpec, JobConfig
from jobs.datasets import dataset_info
from jobs.mlflow.registry import register_detector
from jobs.mlflow.tracking import Tracker, ensure_tracking_store
from jobs.train.job import existing_run_id, job_run_id, run_storage, run_training
from jobs.tune.config import Distribution, SweepConfig, trial_job, with_values
from jobs.tune.results import TrialRow, best_row, results_table, trial_row
from pipeline.storage import is_s3, join

TAG_SWEEP = "dhrcnn.sweep"
TAG_STATUS = "dhrcnn.tune.status"
TAG_REGISTERED = "dhrcnn.tune.registered_model_uri"
TAG_REGISTERED_TRIAL = "dhrcnn.tune.registered_trial"


@dataclass(frozen=True)
class SweepResult:
    """What a sweep produced.

    Attributes:
        rows: one per trial, in trial order.
        best: the best completed trial (by the sweep's metric and mode), ``None`` if none completed.
        model_uri: the best trial's model: ``models:/NAME/VERSION`` when registered, else its logged URI.
        parent_run_id: the sweep's MLflow run.
        path: the Tune experiment (``<run.storage_path>/<run.name>``).
        interrupted: the sweep stopped before its trials ended (nothing registered; run it again to resume).
    """

    rows: tuple[TrialRow, ...]
    best: TrialRow | None
    model_uri: str | None
    parent_run_id: str
    path: str
    interrupted: bool = False


def search_space(space: Mapping[str, Distribution]) -> dict[str, Any]:
    """Tune's ``param_space``: dotted job key -> Tune domain (``randint`` made inclusive of its high end)."""
    domains = {
        "uniform": lambda a: ray.tune.uniform(*a),
        "loguniform": lambda a: ray.tune.loguniform(*a),
        "randint": lambda a: ray.tune.randint(a[0], a[1] + 1),
        "choice": lambda a: ray.tune.choice(list(a)),
        "grid": lambda a: ray.tune.grid_search(list(a)),
    }
    return {key: domains[d.kind](d.args) for key, d in space.items()}


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run (and MLflow run) name of a trial: stable across restores of the sweep."""
    return f"{sweep_name}-{trial_id}"


def train_trial(params: dict[str, Any], *, sweep: SweepConfig, parent_run_id: str, trials_path: str) -> None:
    """Tune's function trainable (the trial's driver): one Ray Train run, resumed by name if it exists."""
    trial_id = ray.tune.get_context().get_trial_id()
    job = trial_job(sweep, params, trial_run_name(sweep.job.run.name, trial_id), trials_path)
    run_training(job, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)


def run_sweep(sweep: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep to completion on the current Ray cluster, register the best model and log the
    results to the parent MLflow run."""
    job = absolute_paths(sweep.job)
    job = replace(job, tracking=ensure_tracking_store(job.tracking))
    sweep = replace(sweep, job=job)
    storage = job.data.storage
    sweep_dir = join(job.run.storage_path, job.run.name)
    trials_path = join(sweep_dir, "trials")
    fingerprint = dataset_info(job.data.train, storage, with_gt=False).fingerprint
    parent_run_id = job_run_id(job.tracking, sweep_dir, storage, job, fingerprint)
    parent = Tracker(job.tracking)
    parent.start(parent_run_id)
    parent.log_params({"tune": sweep.tune.to_dict()})
    parent.set_tags({TAG_SWEEP: job.run.name})

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(train_trial, sweep=sweep, parent_run_id=parent_run_id, trials_path=trials_path),
        {"CPU": sweep.tune.trial_cpus},
    )
    grid = _tuner(sweep, trainable).fit()

    rows = []
    for result in sorted(grid, key=lambda r: str(r.metrics.get("trial_id"))):
        trial_id = str(result.metrics["trial_id"])
        run_id = existing_run_id(join(trials_path, trial_run_name(job.run.name, trial_id)), storage)
        rows.append(trial_row(result, sweep, run_id))
    _close_trial_runs(rows, job)
    if any(row.status == "unfinished" for row in rows):  # interrupted (Ctrl+C): the same command resumes it
        _log_summary(parent, rows, None, None, sweep)
        parent.end("KILLED")
        return SweepResult(tuple(rows), None, None, parent_run_id, sweep_dir, interrupted=True)
    best = best_row(rows, sweep.tune.mode)
    model_uri = _register_best(best, job, parent_run_id) if best is not None else None
    _log_summary(parent, rows, best, model_uri, sweep)
    parent.end("FINISHED")
    return SweepResult(tuple(rows), best, model_uri, parent_run_id, sweep_dir)


def _tuner(sweep: SweepConfig, trainable: Any) -> ray.tune.Tuner:
    """A new Tuner, or the sweep's experiment restored: finished/stopped trials kept, the others resumed."""
    job, tune = sweep.job, sweep.tune
    filesystem, storage_path = run_storage(job.run.storage_path, job.data.storage)
    experiment = f"{storage_path.rstrip('/')}/{job.run.name}"
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        print(f"sweep {job.run.name}: resuming the Tune experiment in {experiment}", flush=True)
        return ray.tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=job.train.epochs,
        grace_period=tune.scheduler.grace_period,
        reduction_factor=tune.scheduler.reduction_factor,
    )
    return ray.tune.Tuner(
        trainable,
        param_space=search_space(tune.space),
        tune_config=ray.tune.TuneConfig(
            metric=tune.metric,
            mode=tune.mode,
            num_samples=tune.num_samples,
            scheduler=scheduler,
            # the generator enforces the bound (TuneConfig.max_concurrent_trials is ignored with a search_alg)
            search_alg=BasicVariantGenerator(max_concurrent=tune.max_concurrent_trials, random_state=tune.seed),
        ),
        run_config=ray.tune.RunConfig(name=job.run.name, storage_path=storage_path, storage_filesystem=filesystem),
    )


def _close_trial_runs(rows: list[TrialRow], job: JobConfig) -> None:
    """Tag every trial's MLflow run with its status; runs of stopped (killed) or failed trials are ended."""
    client = MlflowClient(tracking_uri=job.tracking.tracking_uri)
    end = {"stopped early": "KILLED", "error": "FAILED"}
    for row in rows:
        if row.run_id is None:
            continue
        client.set_tag(row.run_id, TAG_STATUS, row.status)
        if row.status in end and client.get_run(row.run_id).info.status == "RUNNING":
            client.set_terminated(row.run_id, end[row.status])


def _register_best(best: TrialRow, job: JobConfig, parent_run_id: str) -> str | None:
    """Register the best trial's logged model under the sweep's name, once per best trial (a sweep started
    again after it ended registers nothing new; one whose resumed trials beat the best registers that one)."""
    name, uri = job.tracking.registered_model_name, job.tracking.tracking_uri
    if name is None or best.model_uri is None:
        return best.model_uri
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_run(parent_run_id).data.tags
    if tags.get(TAG_REGISTERED_TRIAL) == best.trial_id and tags.get(TAG_REGISTERED):
        return tags[TAG_REGISTERED]
    version = register_detector(best.model_uri, name, best.metrics, tracking_uri=uri)
    model_uri = f"models:/{name}/{version}"
    client.set_tag(parent_run_id, TAG_REGISTERED, model_uri)
    client.set_tag(parent_run_id, TAG_REGISTERED_TRIAL, best.trial_id)
    return model_uri


def _log_summary(
    parent: Tracker, rows: list[TrialRow], best: TrialRow | None, model_uri: str | None, sweep: SweepConfig
) -> None:
    """The results table, the rows as JSON and the best trial's job config on the sweep's MLflow run."""
    table = results_table(rows, list(sweep.tune.space), sweep.tune.metric)
    parent.log_text(table + "\n", "tune/results.md")
    parent.log_text(json.dumps([r.to_dict() for r in rows], indent=2, default=str), "tune/results.json")
    if best is None:
        return
    parent.set_tags({"dhrcnn.tune.best_trial": best.trial_id, "dhrcnn.tune.best_model_uri": model_uri or ""})
    if best.value is not None:
        parent.log_metrics({f"best/{sweep.tune.metric}": best.value}, step=0)
    best_job = with_values(sweep.job, best.params)
    best_job = replace(best_job, run=replace(best_job.run, name=f"{sweep.job.run.name}-best"))
    parent.log_text(yaml.safe_dump(best_job.to_dict(), sort_keys=False), "tune/best_config.yaml")


def absolute_paths(job: JobConfig) -> JobConfig:
    """``job`` with its local paths (datasets, backbone weights, run storage) made absolute: Tune runs each
    trial in its own working directory."""

    def local(path: str | None) -> str | None:
        return path if path is None or is_s3(path) else os.path.abspath(path)

    def spec(s: DatasetSpec | None) -> DatasetSpec | None:
        if s is None:
            return None
        return DatasetSpec(parquet=local(s.parquet), annotations=local(s.annotations), images=local(s.images))

    model = replace(job.model, backbone=replace(job.model.backbone, weights=local(job.model.backbone.weights)))
    return replace(
        job,
        model=model,
        data=replace(job.data, train=spec(job.data.train), val=spec(job.data.val)),
        run=replace(job.run, storage_path=local(job.run.storage_path) or job.run.storage_path),
    )

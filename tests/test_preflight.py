"""Preflight: the checks on the driver before any Train worker starts (no Ray needed)."""

from __future__ import annotations

import pytest

from jobs.config import resolve_job_config
from jobs.datasets import DatasetInfo
from jobs.train.preflight import PreflightError, preflight
from pipeline.categories import CategoryMap

CATS = CategoryMap.from_pairs([(1, "cat"), (2, "dog"), (5, "bird")])


def _job(num_classes: int = 3, workers: int = 2, batch: int = 2, cpus: float = 1.0):
    return resolve_job_config(
        {
            "model": {"preset": "tiny", "num_classes": num_classes},
            "data": {"train": {"parquet": "/d/train"}, "val": {"parquet": "/d/val"}, "batch_size": batch},
            "scaling": {"num_workers": workers, "cpus_per_worker": cpus},
        }
    )


def _info(images: int, categories: CategoryMap = CATS) -> DatasetInfo:
    return DatasetInfo(images, categories, "fp", {})


def test_a_valid_job_passes():
    preflight(_job(), _info(4), _info(2), cluster_cpus=3.0, autoscaling=False)


@pytest.mark.parametrize(
    ("job", "train", "val", "cpus", "expected"),
    [
        (
            _job(num_classes=5),
            _info(8),
            None,
            8.0,
            r"model.num_classes is 5 but data.train has 3 categories "
            r"\(cat, dog, bird\): set model.num_classes=3",
        ),
        (
            _job(),
            _info(8),
            _info(2, CategoryMap.from_pairs([(1, "cat"), (2, "dog")])),
            8.0,
            r"data.val's categories \(2: cat, dog\) differ from data.train's \(3\)",
        ),
        (
            _job(workers=2, batch=4),
            _info(7),
            None,
            8.0,
            r"data.train has 7 images, fewer than scaling.num_workers x "
            r"data.batch_size = 2 x 4: no worker would take a single step",
        ),
        (
            _job(workers=2, cpus=1.5),
            _info(8),
            None,
            3.5,
            r"the Ray cluster has 3.5 CPUs and the 2 Train workers take "
            r"3 \(scaling.num_workers x scaling.cpus_per_worker\): none is left for Ray Data's decoding",
        ),
    ],
)
def test_each_problem_names_the_key_and_the_fix(job, train, val, cpus, expected):
    with pytest.raises(PreflightError, match=expected):
        preflight(job, train, val, cluster_cpus=cpus, autoscaling=False)


def test_problems_are_listed_together_and_an_autoscaler_skips_the_cpu_check():
    job = _job(num_classes=4, workers=2, batch=4, cpus=2.0)
    with pytest.raises(PreflightError) as info:
        preflight(job, _info(3), None, cluster_cpus=4.0, autoscaling=False)
    assert str(info.value).count("\n  - ") == 3
    preflight(_job(cpus=2.0), _info(8), None, cluster_cpus=0.0, autoscaling=True)  # nodes will come


def test_a_run_directory_refuses_another_job_and_records_a_finished_one(tmp_path):
    from jobs.train.identity import JobIdentityError, check_identity, finished_result, record_result
    from pipeline.storage import StorageConfig

    run_dir, storage = str(tmp_path / "runs" / "dh"), StorageConfig()
    job = _job()
    check_identity(run_dir, storage, job, "fp-1")  # a new run directory: recorded
    check_identity(run_dir, storage, job, "fp-1")  # the same job again: resumes
    more_epochs = resolve_job_config({**job.to_dict(), "train": {**job.to_dict()["train"], "epochs": 24}})
    check_identity(run_dir, storage, more_epochs, "fp-1")  # epochs may change on a resume
    other_lr = resolve_job_config({**job.to_dict(), "train": {**job.to_dict()["train"], "base_lr": 0.01}})
    with pytest.raises(
        JobIdentityError, match=r"holds another job .*train.base_lr: '0.02' -> '0.01'.*another run.name"
    ):
        check_identity(run_dir, storage, other_lr, "fp-1")
    with pytest.raises(JobIdentityError, match=r"training set fp-1 -> fp-2"):
        check_identity(run_dir, storage, job, "fp-2")

    assert finished_result(run_dir, storage, epochs=12) is None
    record_result(run_dir, storage, 12, {"metrics": {"val/AP": 0.4}, "checkpoint_path": None, "run_id": "r1"})
    assert finished_result(run_dir, storage, epochs=12)["metrics"] == {"val/AP": 0.4}
    assert finished_result(run_dir, storage, epochs=24) is None, "more epochs: the job trains on"


def test_a_resume_with_another_data_layout_needs_the_rescale_asked_for(tmp_path):
    import json

    from jobs.train.identity import IDENTITY_FILE, JobIdentityError, check_identity
    from pipeline.storage import StorageConfig

    run_dir, storage = str(tmp_path / "runs" / "dh"), StorageConfig()
    assert check_identity(run_dir, storage, _job(workers=2, batch=2), "fp-1") is None
    with pytest.raises(
        JobIdentityError, match=r"scaling.num_workers: '2' -> '4'.*run.resume_rescale=true.*num_workers=2"
    ):
        check_identity(run_dir, storage, _job(workers=4, batch=2), "fp-1")
    rescale = resolve_job_config({**_job(workers=4, batch=2).to_dict(), "run": {"resume_rescale": True}})
    assert check_identity(run_dir, storage, rescale, "fp-1") == "scaling.num_workers: 2 -> 4"
    recorded = json.loads((tmp_path / "runs" / "dh" / IDENTITY_FILE).read_text())
    assert recorded["config"]["scaling.num_workers"] == "4", "the new layout is the job's from now on"
    assert check_identity(run_dir, storage, _job(workers=4, batch=2), "fp-1") is None
    other_lr = resolve_job_config({**rescale.to_dict(), "train": {**rescale.to_dict()["train"], "base_lr": 0.01}})
    with pytest.raises(JobIdentityError, match="holds another job"):  # the rescale allows the layout only
        check_identity(run_dir, storage, other_lr, "fp-1")

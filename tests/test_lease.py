"""The run directory's lease (``jobs/train/lease.py``): one job at a time per ``run.storage_path``/``run.name``, on a
local path and on a real S3 server (moto, with its conditional requests), and at ``run_training``'s entry."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.train.lease import LEASE_FILE, LOCK_FILE, LeaseHeldError, LeaseLostError, RunLease
from pipeline.storage import exists, join, read_bytes, write_bytes

ROOT = Path(__file__).resolve().parent.parent
HOLD_AND_SLEEP = (
    "import sys, time; from jobs.train.lease import RunLease; "
    "RunLease(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "job")
    return join(request.getfixturevalue("s3_bucket"), "runs", "job")


def lease_record(run_dir: str) -> dict:
    return json.loads(read_bytes(join(run_dir, LEASE_FILE)))


def plant_lease(run_dir: str, *, host: str, pid: int, expires_in_s: float) -> dict:
    """A lease written by hand, as a job that died would have left it."""
    now = time.time()
    record = {"owner": "f" * 32, "host": host, "pid": pid, "started": now - 600, "renewed": now - 60}
    record["expires"] = now + expires_in_s
    write_bytes(join(run_dir, LEASE_FILE), json.dumps(record).encode())
    return record


def test_second_job_is_refused_with_the_holder_named(run_dir):
    with RunLease(run_dir) as first:
        with pytest.raises(LeaseHeldError) as refused:
            RunLease(run_dir).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "running since" in message and "valid until" in message and "UTC" in message
        assert "another run.name" in message and f"remove {first.path} by hand" in message
        assert lease_record(run_dir)["owner"] == first.owner  # the refused job left the lease alone
    assert not exists(join(run_dir, LEASE_FILE))


def test_a_released_lease_can_be_taken_again(run_dir):
    with RunLease(run_dir):
        pass
    with RunLease(run_dir) as second:
        assert lease_record(run_dir)["owner"] == second.owner


def test_released_on_an_error_inside(run_dir):
    with pytest.raises(KeyboardInterrupt), RunLease(run_dir):
        raise KeyboardInterrupt
    assert not exists(join(run_dir, LEASE_FILE))


def test_live_lease_of_another_host_is_refused_an_expired_one_taken_over(run_dir):
    plant_lease(run_dir, host="other-host", pid=1, expires_in_s=60)
    with pytest.raises(LeaseHeldError, match="pid 1 on other-host"):
        RunLease(run_dir).acquire()
    plant_lease(run_dir, host="other-host", pid=1, expires_in_s=-1)
    with RunLease(run_dir) as taker:
        assert lease_record(run_dir)["owner"] == taker.owner


def test_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(run_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_SLEEP, run_dir],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(LeaseHeldError, match=f"pid {holder.pid} "):
            RunLease(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert lease_record(run_dir)["expires"] > time.time() + 60  # not expired: the dead pid alone frees it
    with RunLease(run_dir) as taker:
        assert lease_record(run_dir)["owner"] == taker.owner


@pytest.mark.parametrize("expired_first", [False, True], ids=["fresh", "expired"])
def test_racing_starters_exactly_one_wins(run_dir, expired_first):
    """Eight starters at once. On S3 the conditional requests decide; moto 5.2.6 enforces them (412) but checks
    and writes without a lock of its own, so its atomicity rests on the narrow window between the two (0 double
    winners in 60 races of 8 measured here); AWS S3 and MinIO guarantee it."""
    if expired_first:  # racing to take over one expired lease: the conditional replace lets only one through
        plant_lease(run_dir, host="other-host", pid=1, expires_in_s=-1)
    else:  # racing to create it: the conditional create lets only one through
        RunLease(run_dir).acquire().release()  # the run directory (and S3 client setup) exists before the race
    leases = [RunLease(run_dir, interrupt_main=False) for _ in range(8)]
    start = threading.Barrier(len(leases))
    won, refused, failed = [], [], []

    def start_job(lease: RunLease) -> None:
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeldError:
            refused.append(lease)
        except Exception as err:
            failed.append(err)

    threads = [threading.Thread(target=start_job, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not failed
        assert len(won) == 1 and len(refused) == len(leases) - 1
        assert lease_record(run_dir)["owner"] == won[0].owner
    finally:
        for lease in won:
            lease.release()


def test_heartbeat_keeps_the_lease_past_its_ttl(run_dir):
    with RunLease(run_dir, ttl_s=1.5, renew_every_s=0.3):
        first = lease_record(run_dir)["expires"]
        time.sleep(2.5)
        assert lease_record(run_dir)["expires"] > first + 1
        with pytest.raises(LeaseHeldError):
            RunLease(run_dir).acquire()


def test_a_lease_taken_over_is_noticed_and_left_to_its_new_holder(run_dir):
    lease = RunLease(run_dir, ttl_s=5, renew_every_s=0.2, interrupt_main=False)
    with pytest.raises(LeaseLostError, match="taken over by another job"), lease:
        theirs = plant_lease(run_dir, host="other-host", pid=1, expires_in_s=60)  # as a takeover would write it
        deadline = time.monotonic() + 10
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.lost
    assert lease_record(run_dir)["owner"] == theirs["owner"]  # releasing did not delete the new holder's lease


def test_a_lost_lease_is_reported_however_the_job_ends(run_dir):
    """Ray Train's SIGINT handler ends an interrupted ``fit`` with ``SystemExit(0)``: still a lost lease."""
    lease = RunLease(run_dir, ttl_s=5, renew_every_s=0.2, interrupt_main=False)
    with pytest.raises(LeaseLostError), lease:
        plant_lease(run_dir, host="other-host", pid=1, expires_in_s=60)
        deadline = time.monotonic() + 10
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.1)
        raise SystemExit(0)


# -- at run_training's entry -------------------------------------------------------------------------------------


def test_run_training_is_refused_before_it_writes_to_a_leased_run_directory(synth_dataset, tmp_path):
    """A second job with the same run.name is refused after its dataset checks, before identity.json, the MLflow
    run, config.yaml or any Ray Train run (all of which would be in the run directory or the MLflow store)."""
    from jobs.config import resolve_job_config
    from jobs.train.job import run_training

    job = resolve_job_config(
        {
            "model": {"preset": "tiny", "num_classes": 3},
            "data": {
                "train": {"parquet": str(synth_dataset / "parquet" / "train")},
                "val": {"parquet": str(synth_dataset / "parquet" / "val")},
                "batch_size": 2,
            },
            "train": {"epochs": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": None},
            "run": {"name": "twice", "storage_path": str(tmp_path / "runs")},
        }
    )
    run_dir = str(tmp_path / "runs" / "twice")
    with RunLease(run_dir) as first:
        with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()} "):
            run_training(job)
        assert sorted(os.listdir(run_dir)) == [LOCK_FILE, LEASE_FILE]  # the first job's lease, nothing else
        assert lease_record(run_dir)["owner"] == first.owner
    assert not (tmp_path / "mlflow.db").exists()

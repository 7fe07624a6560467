"""A tracking URI's credentials stay out of everything Ray Train keeps and writes: a short training job whose
tracking URI carries secret query values (``?token=...&password=...``; the sqlite store ignores them, so the job
really tracks) leaves them in no file of its run directory, of this Ray session's directory, nor in the console,
while its workers still log to the store through the real URI. (Before: the ``run_uri`` metric carried the URI into
``result.json``, Ray Train's ``checkpoint_manager_snapshot.json`` and its worker logs; the job config in
``train_loop_config`` is also what Ray Train's state tracking keeps and exports.)"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from jobs.config import resolve_job_config
from jobs.train.job import run_training
from tests.test_train_job import make_job

SECRETS = (b"t0k3n", b"s3cret")


def _files_holding(root: Path, secrets: tuple[bytes, ...]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, files that went away
                continue
            found += [f"{path}: {s.decode()}" for s in secrets if s in data]
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tracking_uri_credentials_are_in_no_file_ray_writes_nor_on_the_console(synth_dataset, tmp_path, capfd):
    import ray

    raw = make_job(synth_dataset, tmp_path, "secret", epochs=1).to_dict()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}?token={SECRETS[0].decode()}&password={SECRETS[1].decode()}"
    raw["tracking"] = {**raw["tracking"], "tracking_uri": uri, "registered_model_name": "dh-secret"}
    result = run_training(resolve_job_config(raw))

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert "val/AP" in run.data.metrics and "train/loss" in run.data.metrics, "the workers reached MLflow"
    assert result.metrics["model_uri"] == "models:/dh-secret/1"

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    out, err = capfd.readouterr()
    console = [f"console: {s.decode()}" for s in SECRETS if s.decode() in out + err]
    found = _files_holding(tmp_path / "runs", SECRETS) + _files_holding(session, SECRETS) + console
    assert not found, "the tracking URI's secrets are in:\n" + "\n".join(found)
    assert "token=***" in result.metrics["run_uri"]

"""``dhrcnn quickstart``'s console contract, end to end in a subprocess (its own local Ray): a bar per phase, the
box AP table once, the MLflow run, the registered model and the picture; nothing of Ray's own output; and all it
leaves in the working directory is ignored by the repository's ``.gitignore``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import RAY_TEST_ENV

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 40  # the full quickstart (300 images, 8 epochs) prints about as many; Ray's own output: thousands

# Ray's own output, which stays in the Ray session's log files unless --verbose
RAY_NOISE = (
    "TrainingReport",
    "Execution plan",
    "Starting execution",
    "Running Dataset",
    "Progress bars",
    "Token authentication",
    "exclude_resources",
    "CloudPickle",
    "creating index",
    "(RayTrainWorker",
    "(TrainController",
    "(SplitCoordinator",
    "Traceback",
)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quickstart_prints_progress_and_results_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "quickstart", "train.epochs=1", "synth.num_images=40"],
        cwd=tmp_path,
        env={**env, **RAY_TEST_ENV, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=1440,  # 80 s on a quiet 2-core machine; beside two busy processes it took over 540 s
    )
    elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    lines = output.splitlines()
    assert len(lines) <= MAX_LINES, output
    assert not [noise for noise in RAY_NOISE if noise in output], output

    assert sum(line.startswith("data: 100%") for line in lines) == 1, output
    assert any(line.startswith("train: 100%") and "8/8" in line and "loss" in line for line in lines), output
    assert any(line.startswith("eval @ iter 8: 100%") and "8/8" in line and "AP " in line for line in lines), output
    assert sum(line.startswith("box AP (synthetic val): ") for line in run.stdout.splitlines()) == 1, output
    table = [line for line in lines if line.startswith((" Average Precision", " Average Recall"))]
    assert len(table) == 12, output
    assert f"MLflow run:   sqlite:///{tmp_path.resolve()}/mlflow.db run " in run.stdout
    assert "model:        models:/double-head-frcnn/1" in run.stdout
    picture = tmp_path.resolve() / "dhrcnn_quickstart_predictions.png"
    assert f"predictions:  {picture}" in run.stdout and picture.stat().st_size > 0

    if shutil.which("git") and (REPO / ".git").exists():
        left = sorted(p.name + ("/" if p.is_dir() else "") for p in tmp_path.iterdir())
        check = subprocess.run(
            ["git", "-C", str(REPO), "check-ignore", "--no-index", "--verbose", "--non-matching", *left],
            capture_output=True,
            text=True,
        )
        unignored = [line.split("\t")[-1] for line in check.stdout.splitlines() if line.startswith("::")]
        assert unignored == [], f"the quickstart leaves {unignored} untracked in a clone"
    print(f"quickstart (40 images, 1 epoch): {len(lines)} lines, {elapsed:.0f} s")

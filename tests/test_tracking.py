"""MLflow tracking, the detector pyfunc and the registry helpers (``jobs/mlflow/``: tracking.py, pyfunc_model.py,
registry.py).

A local sqlite store (one per module: creating its schema takes seconds) serves the run, resume and pyfunc tests;
a real ``mlflow server`` with artifacts proxied to the moto S3 server serves the same flow over HTTP. The
detector is the seeded ``tiny`` preset with random weights: its boxes are arbitrary but deterministic, which is
all a round trip needs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from jobs.local_s3 import S3Server, free_port
from jobs.mlflow.pyfunc_model import load_detector, log_detector, torch_detector, unwrap
from jobs.mlflow.registry import CHAMPION, RegistryError, list_models, promote, pull
from jobs.mlflow.tracking import Tracker, TrackingConfig, ensure_tracking_store, flatten_config, git_commit, run_tags
from jobs.mlflow.uri import TrackingError
from model.build import build_model
from model.config import model_config
from pipeline.categories import CategoryMap
from pipeline.decode import decode_image
from pipeline.transforms import ResizeConfig, eval_transform

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
CATEGORIES = CategoryMap.from_pairs([(1, "circle"), (3, "square"), (7, "triangle")])
RESIZE = ResizeConfig(train_min_sizes=(96,), test_min_size=96, max_size=160)
TRAINING_CONFIG = {
    "model": {"preset": "tiny", "num_classes": 3},
    "train": {"lr": 0.02, "milestones": [8, 11], "seed": 0},
    "storage": {
        "endpoint_url": f"http://admin:{SECRET}@127.0.0.1:9000",
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": SECRET,
        "session_token": SECRET,
    },
    "tracking": {"password": SECRET, "experiment_name": "double-head-frcnn"},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with the schema and nothing else, copied by each store below: building the
    schema (migrations) costs several seconds on 2 busy cores, the copy nothing."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def sqlite_cfg(tmp_path_factory: pytest.TempPathFactory, empty_db: Path) -> TrackingConfig:
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copyfile(empty_db, db)
    return ensure_tracking_store(TrackingConfig(tracking_uri=f"sqlite:///{db}", experiment_name="test-tracking"))


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config("tiny", CATEGORIES.num_classes)).eval()


def _encoded(height: int, width: int, fmt: str, seed: int) -> bytes:
    """A smooth random image (so JPEG keeps it recognisable) of a size the model never saw."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    pixels = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pixels.save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = [_encoded(70, 90, "PNG", 1), _encoded(123, 61, "JPEG", 2)]


def _expected(detector: torch.nn.Module, data: bytes) -> dict[str, np.ndarray]:
    """The in-memory model by hand: decode -> eval resize -> model -> boxes divided by the scale factors."""
    image = decode_image(data, image_id=0, file_name="expected")
    out = eval_transform(image, np.zeros((0, 4), np.float32), RESIZE)
    with torch.inference_mode():
        found = detector([torch.from_numpy(out.image.copy()).permute(2, 0, 1)])[0]
    sx, sy = out.scale_factor
    return {
        "boxes": found["boxes"].double().numpy() / np.array([sx, sy, sx, sy]),
        "scores": found["scores"].numpy(),
        "labels": found["labels"].numpy(),
    }


def _assert_same(predicted: pd.DataFrame, expected: list[dict[str, np.ndarray]]) -> None:
    assert list(predicted.columns) == ["boxes", "scores", "labels", "category_ids", "category_names"]
    assert len(predicted) == len(expected)
    for (_, row), want in zip(predicted.iterrows(), expected, strict=True):
        assert len(want["boxes"]) > 0  # random weights still produce detections above 0.05
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), want["boxes"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(row["scores"], want["scores"], atol=1e-5, rtol=0)
        assert list(row["labels"]) == want["labels"].tolist()
        assert list(row["category_ids"]) == [CATEGORIES.category_id_of(int(v)) for v in want["labels"]]
        assert list(row["category_names"]) == [CATEGORIES.name_of(int(v)) for v in want["labels"]]


def _log(tracker: Tracker, detector: torch.nn.Module, ap: float, name: str) -> str:
    _, version = tracker.log_detector(
        model=detector,
        model_cfg=model_config("tiny", CATEGORIES.num_classes),
        categories=CATEGORIES.to_dict(),
        resize_cfg=RESIZE,
        metrics={"val/AP": ap, "val/AP50": ap + 0.1},
        training_config=TRAINING_CONFIG,
        registered_model_name=name,
    )
    assert version is not None
    return version


def _registry_flow(
    cfg: TrackingConfig, detector: torch.nn.Module, name: str, aps: tuple[float, ...], all_inputs: bool = True
) -> str:
    """Log one version per AP, check the champion rule after each, predict with the champion (base64 DataFrame;
    with ``all_inputs`` also the serving JSON, raw bytes and arrays). Returns the run id."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    tracker = Tracker(cfg)
    run_id = tracker.start()
    best: tuple[float, str] | None = None
    for ap in aps:
        version = _log(tracker, detector, ap, name)
        if best is None or ap > best[0]:
            best = (ap, version)
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == best[1], f"after AP {ap}"
        assert client.get_model_version(name, version).tags["AP"] == f"{ap:.6g}"
    tracker.end()

    loaded = load_detector(f"models:/{name}@{CHAMPION}", tracking_uri=cfg.tracking_uri)
    expected = [_expected(detector, data) for data in IMAGES]
    b64 = [base64.b64encode(data).decode("ascii") for data in IMAGES]
    _assert_same(loaded.predict(pd.DataFrame({"image": b64})), expected)
    if not all_inputs:
        return run_id
    # What `mlflow models serve` does with the {"inputs": ...} JSON form (one row holding a list of images):
    # parse against the signature, then predict. The dataframe_split form goes through a real server below.
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    payload = json.dumps({"inputs": {"image": b64}})
    parsed = infer_and_parse_data(json.loads(payload), loaded.metadata.get_input_schema())
    _assert_same(loaded.predict(parsed), expected)
    # Python callers: raw bytes and decoded arrays give the same answer.
    arrays = [decode_image(data, image_id=i, file_name="x") for i, data in enumerate(IMAGES)]
    _assert_same(loaded.predict(pd.DataFrame({"image": [IMAGES[0], arrays[1]]})), expected)
    assert unwrap(loaded).categories == CATEGORIES and unwrap(loaded).resize == RESIZE
    for a, b in zip(torch_detector(loaded).state_dict().values(), detector.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    return run_id


@pytest.mark.timeout(60)
def test_flatten_config_drops_secrets_and_truncates() -> None:
    flat = flatten_config({**TRAINING_CONFIG, "long": "x" * 7000, "none": None})
    assert flat["train.lr"] == "0.02" and flat["train.milestones"] == "[8, 11]" and flat["none"] == "None"
    assert len(flat["long"]) == 6000
    assert not any(
        k.startswith(("storage.access_key", "storage.secret", "storage.session", "tracking.pass")) for k in flat
    )
    assert all(SECRET not in v for v in flat.values())
    assert flat["storage.endpoint_url"] == "http://admin:***@127.0.0.1:9000"


@pytest.mark.timeout(90)
def test_run_params_metrics_artifacts_and_resume(sqlite_cfg: TrackingConfig, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(sqlite_cfg.tracking_uri)
    tracker = Tracker(sqlite_cfg)
    run_id = tracker.start()
    tracker.log_config(TRAINING_CONFIG)
    tracker.set_tags(run_tags("manifest-sha256:abc", extra={"job": "unit", "aws_secret_access_key": SECRET}))
    for step in (0, 10, 20):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.02}, step)
    tracker.log_text("| class | AP |\n", "eval/per_class_ap.md")
    (tmp_path / "plot.txt").write_text("pr curve")
    tracker.log_artifact(tmp_path / "plot.txt", "plots")

    # A restarted worker resumes the same run and replays steps 10 and 20 before reaching 30.
    resumed = Tracker(sqlite_cfg)
    assert resumed.start(run_id) == run_id
    resumed.log_config(TRAINING_CONFIG)  # same params again: accepted, nothing changes
    for step in (10, 20, 30):
        resumed.log_metrics({"loss": -1.0, "lr": 0.002}, step)
    resumed.log_metrics({"val/AP": 0.4}, 20)  # a new key may start at any step
    resumed.end()
    assert Tracker(sqlite_cfg, enabled=False).start() is None  # disabled (rank > 0): no run

    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [0, 10, 20, 30]
    assert {m.step: m.value for m in history}[10] == pytest.approx(1.0 / 11)
    assert [m.step for m in client.get_metric_history(run_id, "val/AP")] == [20]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert run.data.params["train.lr"] == "0.02"
    assert run.data.tags["dataset.fingerprint"] == "manifest-sha256:abc"
    assert run.data.tags["version.torch"] == torch.__version__
    if git_commit() is not None:
        assert run.data.tags["mlflow.source.git.commit"] == git_commit()
    for key, value in {**run.data.params, **run.data.tags}.items():
        assert SECRET not in value and "secret" not in key.lower() and "password" not in key.lower(), key
    local = Path(download_artifacts(run_id=run_id, dst_path=str(tmp_path / "dl"), tracking_uri=sqlite_cfg.tracking_uri))
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert names == ["config.yaml", "eval/per_class_ap.md", "plots/plot.txt"]
    assert "lr: 0.02" in (local / "config.yaml").read_text()
    assert all(SECRET not in (local / n).read_text() for n in names)


@pytest.mark.timeout(200)
def test_pyfunc_round_trip_champion_and_registry(
    sqlite_cfg: TrackingConfig, detector: torch.nn.Module, tmp_path: Path
) -> None:
    name = "dh-sqlite"
    run_id = _registry_flow(sqlite_cfg, detector, name, aps=(0.3, 0.2, 0.5))

    rows = list_models(name, tracking_uri=sqlite_cfg.tracking_uri)
    assert [(r.version, r.aliases, r.ap) for r in rows] == [("3", ("champion",), 0.5), ("2", (), 0.2), ("1", (), 0.3)]
    assert {r.run_id for r in rows} == {run_id}
    assert promote(name, 1, "staging", tracking_uri=sqlite_cfg.tracking_uri).aliases == ("staging",)
    assert promote(name, 3, "staging", tracking_uri=sqlite_cfg.tracking_uri).aliases == ("champion", "staging")

    folder = pull(f"models:/{name}@staging", tmp_path / "pulled", tracking_uri=sqlite_cfg.tracking_uri)
    # a model from code: MLflow runs pyfunc_entry.py to build it; nothing pickled (no python_model.pkl)
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_entry.py") and (folder / "pyfunc_entry.py").is_file()
    assert "python_model" not in flavor and not list(folder.rglob("*.pkl"))
    spec = json.loads((folder / "artifacts" / "detector.json").read_text())
    assert spec["categories"] == CATEGORIES.to_dict() and spec["metrics"]["val/AP"] == 0.5
    assert spec["preprocessing"]["resize"]["test_min_size"] == RESIZE.test_min_size
    assert all(SECRET not in p.read_text(errors="ignore") for p in folder.rglob("*") if p.suffix in {".json", ".yaml"})
    pulled = load_detector(str(folder))
    expected = [_expected(detector, data) for data in IMAGES]
    _assert_same(pulled.predict(pd.DataFrame({"image": list(IMAGES)})), expected)
    _assert_same(_serve_and_predict(folder, tmp_path), expected)

    with pytest.raises(RegistryError, match=r"no alias 'nope'.*champion -> v3"):
        pull(f"models:/{name}@nope", tmp_path / "x", tracking_uri=sqlite_cfg.tracking_uri)
    with pytest.raises(RegistryError, match=r"no registered model 'missing'.*dh-sqlite"):
        list_models("missing", tracking_uri=sqlite_cfg.tracking_uri)
    with pytest.raises(RegistryError, match="has no version 9"):
        promote(name, 9, "champion", tracking_uri=sqlite_cfg.tracking_uri)
    with pytest.raises(RegistryError, match="cannot set alias 'latest'"):
        promote(name, 1, "latest", tracking_uri=sqlite_cfg.tracking_uri)
    other = tmp_path / "sklearn-model"
    other.mkdir()
    (other / "MLmodel").write_text("flavors:\n  sklearn: {sklearn_version: 1.5.0}\n")
    with pytest.raises(RegistryError, match=r"not a Double-Head detector pyfunc \(flavors: sklearn"):
        pull(str(other), tmp_path / "y", tracking_uri=sqlite_cfg.tracking_uri)


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:g}s: {log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started (its process group)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _serve_and_predict(folder: Path, tmp_path: Path) -> pd.DataFrame:
    """``mlflow models serve`` on a pulled folder, from a directory where the project is not importable (no
    PYTHONPATH): the pyfunc must run from its own code/. One JSON request with base64 images."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # `mlflow models serve` runs `uvicorn` from PATH: this interpreter's bin, even without an activated venv
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", proc, log, timeout_s=90)
        b64 = [base64.b64encode(data).decode("ascii") for data in IMAGES]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[s] for s in b64]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return pd.DataFrame(json.loads(response.read())["predictions"])
    finally:
        _stop_group(proc)


@dataclass
class MlflowServer:
    """A ``mlflow server`` process (own process group) and the bucket its artifacts go to."""

    url: str
    bucket: str
    proc: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> str:
        _wait_for(f"{self.url}/health", self.proc, self.log, timeout_s=120)
        return self.url


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(
    s3_server: S3Server, empty_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on 127.0.0.1 with artifacts proxied to ``s3://<bucket>/artifacts`` on moto.

    Autouse so that it boots (tens of seconds on 2 busy cores) while the sqlite tests run; the server test
    waits for it with :meth:`MlflowServer.ready`. Only the server gets the S3 settings: the test process reaches
    artifacts through the server's proxy. The server's whole process group is stopped at the end.
    """
    folder = tmp_path_factory.mktemp("mlflow-server")
    bucket = s3_server.create_bucket()[len("s3://") :]
    port = free_port()
    shutil.copyfile(empty_db, folder / "server.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(s3_server.env)
    env.update({"MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": s3_server.region})
    log = folder / "mlflow-server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", f"s3://{bucket}/artifacts", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", bucket, proc, log)
    finally:
        _stop_group(proc)


@pytest.mark.timeout(170)
def test_real_mlflow_server_with_s3_artifacts(
    mlflow_server: MlflowServer,
    s3_server: S3Server,
    detector: torch.nn.Module,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow import MlflowClient

    # MLflow 3 clients otherwise download S3-backed artifacts through presigned S3 URLs (bypassing the proxy),
    # and moto with authentication enforced answers 500 to presigned GETs. Proxied downloads are what this
    # test checks; bounded HTTP retries make any failure surface in seconds rather than minutes.
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    url, bucket = mlflow_server.ready(), mlflow_server.bucket
    cfg = ensure_tracking_store(TrackingConfig(tracking_uri=url, experiment_name="server-test"))
    assert cfg.tracking_uri == url
    run_id = _registry_flow(cfg, detector, "dh-server", aps=(0.3, 0.2), all_inputs=False)

    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert [r.version for r in list_models("dh-server", tracking_uri=url)] == ["2", "1"]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("artifacts/") and k.endswith("/artifacts/weights.pt") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys)
    folder = pull("models:/dh-server@champion", tmp_path / "pulled", tracking_uri=url)
    assert (folder / "artifacts" / "weights.pt").is_file() and (folder / "code" / "model" / "build.py").is_file()


@pytest.mark.timeout(60)
def test_unreachable_tracking_server_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {uri} is unreachable"):
        ensure_tracking_store(TrackingConfig(tracking_uri=uri))
    with pytest.raises(TrackingError, match="unreachable"):
        Tracker(TrackingConfig(tracking_uri=uri)).start()
    with pytest.raises(TrackingError, match="unreachable"):
        list_models(tracking_uri=uri)
    assert time.monotonic() - start < 10

    # A server that accepts connections but never answers: bounded by 2 attempts x connect_timeout_s.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingError, match="unreachable"):
            ensure_tracking_store(TrackingConfig(tracking_uri=hung, connect_timeout_s=1.0))
        assert time.monotonic() - start < 10


@pytest.mark.timeout(60)
def test_log_detector_checks_its_inputs(detector: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="category map has 3 classes but the model 5"):
        log_detector(detector, model_config("tiny", 5), CATEGORIES.to_dict(), RESIZE, {}, {}, run_id="x")


def test_a_retried_job_registers_its_model_once(sqlite_cfg: TrackingConfig, detector: torch.nn.Module) -> None:
    """The export of a worker group restarted after it (``once_per_run``) finds the run's version: no second
    version, nothing logged again."""
    from mlflow import MlflowClient

    name = "dh-once"
    tracker = Tracker(sqlite_cfg)
    tracker.start()
    logged = []
    for _ in range(2):
        logged.append(
            tracker.log_detector(
                model=detector,
                model_cfg=model_config("tiny", CATEGORIES.num_classes),
                categories=CATEGORIES.to_dict(),
                resize_cfg=RESIZE,
                metrics={"val/AP": 0.4},
                training_config=TRAINING_CONFIG,
                registered_model_name=name,
                once_per_run=True,
            )
        )
    tracker.end()
    assert logged[0][1] == logged[1][1] == "1" and logged[1][0] == f"models:/{name}/1"
    client = MlflowClient(sqlite_cfg.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    experiment = client.get_run(tracker.run_id).info.experiment_id
    mine = client.search_logged_models([experiment], filter_string=f"source_run_id='{tracker.run_id}'")
    assert len(mine) == 1, "the second export logged no model"


class _StaleWriter:
    """A client through which a concurrent job's stale promotion lands right after our first alias write: it had
    read the old champion before our write, and puts its own (worse) version in place."""

    def __init__(self, client, name: str, stale_version: str) -> None:
        self.client, self.name, self.stale_version, self.writes = client, name, stale_version, 0

    def __getattr__(self, attr):
        return getattr(self.client, attr)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)
        self.writes += 1
        if self.writes == 1:
            self.client.set_registered_model_alias(self.name, alias, self.stale_version)


def test_promotion_is_compare_and_set(sqlite_cfg: TrackingConfig) -> None:
    from mlflow import MlflowClient

    from jobs.mlflow.registry import CHAMPION, champion_ap, promote_if_better

    client = MlflowClient(sqlite_cfg.tracking_uri)
    name = "dh-race"
    client.create_registered_model(name)
    for ap in (0.3, 0.5, 0.4):  # v1 the champion; v2 (ours) and v3 (the other job's) both beat it
        client.create_model_version(name, source="file:///nowhere", tags={"AP": str(ap)})
    client.set_registered_model_alias(name, CHAMPION, "1")
    racing = _StaleWriter(client, name, stale_version="3")
    assert promote_if_better(racing, name, "2", 0.5, settle_s=0.0)
    assert racing.writes == 2, "the stale write was seen on re-reading, and undone"
    assert champion_ap(client, name) == ("2", 0.5)
    assert not promote_if_better(client, name, "3", 0.4, settle_s=0.0), "a worse version never takes over"
    assert champion_ap(client, name) == ("2", 0.5)


def test_weights_changed_after_registration_are_refused(
    sqlite_cfg: TrackingConfig, detector: torch.nn.Module, tmp_path: Path
) -> None:
    """The weights' sha256 is recorded in detector.json when logged and on the registry version when registered:
    weights swapped in the artifact store fail the load; weights and detector.json swapped together fail the
    registry check (evaluate, predict, pull)."""
    from mlflow import MlflowClient

    from jobs.evaluate.model_eval import load_for_eval
    from jobs.mlflow.pyfunc_model import file_sha256
    from jobs.mlflow.registry import resolve_artifact_uri

    name, uri = "dh-sha", sqlite_cfg.tracking_uri
    tracker = Tracker(sqlite_cfg)
    tracker.start()
    version = _log(tracker, detector, 0.3, name)
    tracker.end()
    recorded = MlflowClient(uri).get_model_version(name, version).tags["weights_sha256"]
    folder = Path(resolve_artifact_uri(f"models:/{name}/{version}", uri).removeprefix("file://")) / "artifacts"
    weights, spec_path = folder / "weights.pt", folder / "detector.json"
    spec = json.loads(spec_path.read_text())
    assert spec["weights_sha256"] == recorded == file_sha256(weights)
    load_for_eval(f"models:/{name}/{version}", tracking_uri=uri)  # untouched: loads

    state = torch.load(weights, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    torch.save(state, weights)
    with pytest.raises(Exception, match="the weights were changed after logging"):
        load_detector(str(folder.parent))
    spec_path.write_text(json.dumps({**spec, "weights_sha256": file_sha256(weights)}))  # both rewritten
    with pytest.raises(RegistryError, match="changed after registration"):
        load_for_eval(f"models:/{name}/{version}", tracking_uri=uri)
    with pytest.raises(RegistryError, match="changed after registration; nothing was kept"):
        pull(f"models:/{name}/{version}", tmp_path / "pulled", tracking_uri=uri)
    assert not (tmp_path / "pulled").exists()

"""``dhrcnn models`` and ``dhrcnn predict`` (jobs/commands/models.py, jobs/evaluate/batch_predict.py), through the
CLI in-process.

A sqlite MLflow store holds two versions of a seeded ``tiny`` detector with random weights (boxes arbitrary but
deterministic: all a parity check needs). The session's local Ray (``ray_cluster``) runs the actors, with the AWS
variables pointed at the moto S3 server before it started, so that they reach the bucket.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.cli import main
from jobs.config import DatasetSpec
from jobs.evaluate.batch_predict import OUTPUT_SCHEMA
from jobs.evaluate.model_eval import evaluate_model, load_for_eval
from jobs.evaluate.predictor import Detections, Predictor
from jobs.local_s3 import free_port
from jobs.mlflow.registry import list_models
from jobs.mlflow.tracking import Tracker, TrackingConfig, ensure_tracking_store
from jobs.mlflow.uri import tracking_uri_scope
from model.build import build_model
from model.config import model_config
from pipeline.categories import CategoryMap
from pipeline.decode import decode_image
from pipeline.storage import StorageConfig, list_files, read_bytes
from pipeline.synth import SHAPE_CLASSES, SynthConfig, write_synth
from pipeline.transforms import ResizeConfig

NAME = "dh-predict"
CATEGORIES = CategoryMap.from_pairs([(c.category_id, c.name) for c in SHAPE_CLASSES])
RESIZE = ResizeConfig(train_min_sizes=(96,), test_min_size=96, max_size=160)
MODEL_CFG = model_config("tiny", CATEGORIES.num_classes)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _detector(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL_CFG).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.nn.Module]]:
    """The tracking URI of a sqlite store with versions 1 (seed 0, AP 0.3) and 2 (seed 1, AP 0.5: champion)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    cfg = ensure_tracking_store(TrackingConfig(tracking_uri=f"sqlite:///{db}", experiment_name="test-predict"))
    tracker = Tracker(cfg)
    tracker.start()
    detectors = {"1": _detector(0), "2": _detector(1)}
    for (version, detector), ap in zip(detectors.items(), (0.3, 0.5), strict=True):
        _, registered = tracker.log_detector(
            model=detector,
            model_cfg=MODEL_CFG,
            categories=CATEGORIES,
            resize_cfg=RESIZE,
            metrics={"val/AP": ap},
            training_config={"model": {"preset": "tiny"}, "train": {"seed": int(version) - 1}},
            registered_model_name=NAME,
        )
        assert registered == version
    tracker.end()
    return str(cfg.tracking_uri), detectors


def _encoded(width: int, height: int, fmt: str, seed: int, orientation: int | None = None) -> bytes:
    """A smooth random picture of a size the model never saw (optionally with an EXIF orientation tag)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    picture.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


IMAGES = {
    "a.png": _encoded(90, 70, "PNG", 1),
    "b.jpg": _encoded(61, 123, "JPEG", 2),
    "sub/c.jpeg": _encoded(150, 100, "JPEG", 3, orientation=6),  # shown rotated: 100 wide, 150 high
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _alone(detector: torch.nn.Module, data: bytes) -> Detections:
    """The detector on one image alone (a batch of one)."""
    return Predictor(detector, RESIZE)([decode_image(data, image_id=0, file_name="x")])[0]


@pytest.mark.timeout(240)
def test_registry_list_promote_pull_and_predict(
    ray_cluster: None, store: tuple[str, dict[str, torch.nn.Module]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, detectors = store
    code, out, _ = _run(capsys, "models", "list", "--tracking-uri", uri)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["name", "version", "aliases", "AP"]
    assert [line.split()[:4] for line in lines[1:]] == [[NAME, "2", "champion", "0.5000"], [NAME, "1", "-", "0.3000"]]

    code, out, _ = _run(capsys, "models", "promote", NAME, "1", "--alias", "staging", "--tracking-uri", uri)
    assert code == 0 and "version 1" in out
    code, out, _ = _run(capsys, "models", "promote", NAME, "2", "--alias", "staging", "--tracking-uri", uri)
    assert code == 0 and "moved from version 1" in out
    assert [(r.version, r.aliases) for r in list_models(NAME, uri)] == [("2", ("champion", "staging")), ("1", ())]
    _run(capsys, "models", "promote", NAME, "1", "--alias", "staging", "--tracking-uri", uri)
    assert [(r.version, r.aliases) for r in list_models(NAME, uri)] == [("2", ("champion",)), ("1", ("staging",))]

    folder = tmp_path / "pulled"
    pull = ("models", "pull", f"models:/{NAME}@staging", "--out", str(folder), "--tracking-uri", uri)
    code, out, _ = _run(capsys, *pull)
    assert code == 0 and str(folder) in out
    spec = json.loads((folder / "artifacts" / "detector.json").read_text())
    assert spec["categories"] == CATEGORIES.to_dict() and spec["metrics"] == {"val/AP": 0.3}
    assert spec["preprocessing"]["resize"]["test_min_size"] == 96 and spec["training_config"]["train"]["seed"] == 0
    predicted = mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame({"image": list(IMAGES.values())}))
    for (_, row), data in zip(predicted.iterrows(), IMAGES.values(), strict=True):
        want = _alone(detectors["1"], data)
        assert len(want.boxes) > 0
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), want.boxes, atol=1e-4, rtol=0)
        np.testing.assert_allclose(row["scores"], want.scores, atol=1e-5, rtol=0)

    # Batch prediction by alias on a folder holding images of unseen sizes, a stray text file and a fake JPEG.
    images = tmp_path / "images"
    for name, data in {**IMAGES, "notes.txt": b"not an image", "broken.jpg": b"\xff\xd8 truncated"}.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    out_dir = tmp_path / "out"
    code, out, err = _run(
        capsys, "predict", "--model", f"models:/{NAME}@champion", "--images", str(images), "--out", str(out_dir),
        "--render", "2", "--batch-size", "2", "--tracking-uri", uri,
    )  # fmt: skip
    assert code == 0, err
    assert f"skipping 1 files under {images} without an image extension: 'notes.txt'" in err  # before Ray
    assert "skipping 1 files that are not decodable images: 'broken.jpg'" in err  # in the actors
    assert "2 files skipped" in out
    skipped = json.loads((out_dir / "skipped.json").read_text())
    assert sorted(s["file_name"] for s in skipped) == ["broken.jpg", "notes.txt"]

    table = pq.read_table(out_dir / "detections.parquet")
    assert table.schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    names = sorted(IMAGES)  # ids in sorted file-name order over the image files: broken.jpg keeps id 3
    assert [(r["file_name"], r["image_id"]) for r in rows] == [(n, i) for n, i in zip(names, (1, 2, 4), strict=True)]
    assert (rows[2]["width"], rows[2]["height"]) == (100, 150)  # after EXIF orientation
    images_json = json.loads((out_dir / "images.json").read_text())
    assert [(im["id"], im["file_name"], im["width"]) for im in images_json] == [
        (1, "a.png", 90),
        (2, "b.jpg", 61),
        (4, "sub/c.jpeg", 100),
    ]
    results = json.loads((out_dir / "detections.json").read_text())
    for row in rows:
        want = _alone(detectors["2"], IMAGES[row["file_name"]])
        np.testing.assert_allclose(np.reshape(row["boxes"], (-1, 4)), want.boxes, atol=1e-4, rtol=0)
        np.testing.assert_allclose(row["scores"], want.scores, atol=1e-6, rtol=0)
        assert row["labels"] == want.labels.tolist()
        assert row["category_names"] == [CATEGORIES.name_of(v) for v in row["labels"]]
        mine = [d for d in results if d["image_id"] == row["image_id"]]
        assert [d["category_id"] for d in mine] == row["category_ids"]
        x1, y1, x2, y2 = want.boxes[0]
        np.testing.assert_allclose(mine[0]["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-4)
    rendered = sorted(p.relative_to(out_dir / "rendered").as_posix() for p in (out_dir / "rendered").rglob("*.jpg"))
    assert rendered == ["a.jpg", "b.jpg"]
    assert Image.open(out_dir / "rendered" / "a.jpg").size == (90, 70)


@pytest.mark.timeout(180)
def test_predict_on_s3_scores_like_the_training_evaluation(
    ray_cluster: None, store: tuple[str, dict[str, torch.nn.Module]], s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _ = store
    # One image size (no padding differences between the evaluation's batches and single images); objects of
    # 24+ pixels, so that some of the random detector's 100 boxes per image overlap them: AP above 0.
    synth = SynthConfig(num_images=12, seed=3, val_fraction=0.5, size=(128, 96), min_object_size=24, empty_fraction=0)
    write_synth(f"{s3_bucket}/synth", synth)
    gt = f"{s3_bucket}/synth/annotations/instances_val.json"
    images, out = f"{s3_bucket}/synth/images/val", f"{s3_bucket}/pred"
    code, _, err = _run(
        capsys, "predict", "--model", f"models:/{NAME}@champion", "--images", images, "--annotations", gt,
        "--out", out, "--render", "2", "--tracking-uri", uri,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = _run(
        capsys, "evaluate", "--gt", gt, "--detections", f"{out}/detections.json", "--output", f"{out}/m.json"
    )
    assert code == 0, err
    scored = json.loads(read_bytes(f"{out}/m.json"))

    detector = load_for_eval(f"models:/{NAME}@champion", tracking_uri=uri)
    metrics, detections = evaluate_model(detector, DatasetSpec(annotations=gt, images=images), StorageConfig())
    assert metrics.stats["AP"] > 0 and metrics.stats["AR100"] > 0  # something to agree on
    for key, value in metrics.stats.items():
        assert scored[key] == pytest.approx(value, abs=1e-9), key
    mine = json.loads(read_bytes(f"{out}/detections.json"))
    assert len(mine) == len(detections)
    key = lambda d: (d["image_id"], -d["score"])  # noqa: E731
    for a, b in zip(sorted(mine, key=key), sorted(detections, key=key), strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)

    gt_ids = {im["file_name"]: im["id"] for im in json.loads(read_bytes(gt))["images"]}
    table = pq.read_table(io.BytesIO(read_bytes(f"{out}/detections.parquet")))
    assert {r["file_name"]: r["image_id"] for r in table.select(["file_name", "image_id"]).to_pylist()} == gt_ids
    assert len(list_files(f"{out}/rendered", suffixes=(".jpg",))) == 2
    assert not list_files(out, suffixes=("images.json", "skipped.json"))  # ids from the GT; nothing skipped


@pytest.mark.timeout(120)
def test_bad_input_gives_one_line_errors(
    store: tuple[str, dict[str, torch.nn.Module]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _ = store

    echo = tmp_path / "echo.py"  # another pyfunc, logged as a model from code like ours
    echo.write_text(
        "import mlflow.pyfunc\n\n"
        "class Echo(mlflow.pyfunc.PythonModel):\n"
        "    def predict(self, context, model_input, params=None):\n"
        "        return model_input\n\n"
        "mlflow.models.set_model(Echo())\n"
    )
    experiment = mlflow.MlflowClient(uri).get_experiment_by_name("test-predict").experiment_id
    with tracking_uri_scope(uri), mlflow.start_run(experiment_id=experiment):
        mlflow.pyfunc.log_model(name="echo", python_model=str(echo), registered_model_name="echo")
    mlflow.MlflowClient(uri).set_registered_model_alias("echo", "champion", "1")

    def fails(*argv: str) -> str:
        code, out, err = _run(capsys, *argv)
        assert code == 1, (out, err)
        last = err.rstrip("\n").split("\n")[-1]  # earlier lines: MLflow's download progress bar at most
        assert "Traceback" not in err and last.startswith("error: ") and "error" not in err[: -len(last)], err
        return last

    images = tmp_path / "images"
    images.mkdir()
    predict = ("predict", "--images", str(images), "--out", str(tmp_path / "out"), "--tracking-uri", uri)
    champion = f"models:/{NAME}@champion"
    assert f"no images under {images} (nothing there)" in fails(*predict, "--model", champion)
    (images / "readme.md").write_text("hello")
    assert "1 files, none named .jpg/.jpeg/.png" in fails(*predict, "--model", champion)
    (images / "a.jpg").write_bytes(_encoded(64, 48, "JPEG", 0))
    assert "has no alias 'nope' (aliases: champion -> v2" in fails(*predict, "--model", f"models:/{NAME}@nope")
    pull = ("models", "pull", "--tracking-uri", uri, "--out")
    assert "no alias 'nope'" in fails(*pull, str(tmp_path / "x"), f"models:/{NAME}@nope")
    assert "no registered model 'missing'" in fails(*predict, "--model", "models:/missing@champion")
    assert "has no version 7" in fails("models", "promote", NAME, "7", "--alias", "x", "--tracking-uri", uri)
    for argv in ((*predict, "--model", "models:/echo@champion"), (*pull, str(tmp_path / "y"), "models:/echo@champion")):
        assert "models:/echo@champion is not a Double-Head detector pyfunc (flavors: python_function" in fails(*argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "y").exists()

    closed = f"http://127.0.0.1:{free_port()}"
    for argv in (
        ("models", "list", "--tracking-uri", closed),
        ("models", "pull", champion, "--out", str(tmp_path / "z"), "--tracking-uri", closed),
        (
            "predict",
            "--model",
            champion,
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "--tracking-uri",
            closed,
        ),
    ):
        assert f"MLflow tracking server {closed} is unreachable" in fails(*argv)
    shutil.rmtree(images)


def test_rendered_pictures_cannot_be_written_outside_the_output():
    from jobs.evaluate.batch_predict import rendered_name

    assert rendered_name("train/000123.png", 123) == "train/000123.jpg"
    assert rendered_name("./a.jpeg", 1) == "a.jpg"
    for hostile in ("../../etc/cron.d/x.jpg", "a/../../b.jpg", "/abs/x.jpg", "s3://other/x.jpg", "a\\..\\b.jpg"):
        assert rendered_name(hostile, 7) == "image-7.jpg", hostile

"""``dhrcnn evaluate --model FILE`` and ``dhrcnn predict`` on the six COCO photographs of ``coco6/`` give the
detections of the detector alone, and those match mmdetection's (``e2e_r18_coco6.pt``, fixture README §8).

The detector is the fixture's R-18 (random weights, 3 classes) at mmdetection's test resize. Both commands run
through their real paths: ``evaluate`` streams the raw COCO source through Ray Data (decode, resize, batches of
4 images) into :class:`jobs.evaluate.predictor.Predictor`; ``predict`` logs the detector as this project's MLflow model,
lists the image folder and runs the pyfunc in a Ray Data actor. "Alone" is one image per forward pass. The six
images pad to six different shapes, so no image may share a forward pass: the detections must be identical,
not merely close. Against mmdetection, the bound of the JPEG-path parity test applies (our Pillow resize is up
to 1 grey level from mmcv's cv2 resize): >= 80 % of its detections scoring >= 0.05 matched at IoU >= 0.9.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.config import DatasetSpec
from jobs.evaluate.batch_predict import PredictConfig, run_predict
from jobs.evaluate.model_eval import evaluate_model, load_for_eval
from jobs.evaluate.predictor import Detections, Predictor, padded_shape
from jobs.local_s3 import S3Server
from jobs.mlflow.tracking import Tracker, TrackingConfig, ensure_tracking_store
from model.build import build_model
from model.checkpoint import save_model
from model.mmdet_import import config_from_mmdet, convert_state_dict
from pipeline.categories import CategoryMap
from pipeline.coco import load_coco
from pipeline.decode import decode_image
from pipeline.storage import StorageConfig
from tests.mmdet_fixtures import load
from tests.test_parity_e2e_coco6 import COCO6_DIR, E2E, IMAGES, MMDET_DIR, TEST_RESIZE, match

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANNOTATIONS = COCO6_DIR / E2E["ann_file"]
IMAGE_DIR = COCO6_DIR / "images"


@pytest.fixture(scope="module")
def detector() -> tuple[torch.nn.Module, object]:
    weights = load(MMDET_DIR / E2E["weights_fixture"])
    cfg = config_from_mmdet({**weights["model_config"], "test_cfg": E2E["test_cfg"]})
    net = build_model(cfg)
    net.load_state_dict(convert_state_dict(weights["state_dict"]))
    return net.eval(), cfg


@pytest.fixture(scope="module")
def alone(detector: tuple) -> dict[int, Detections]:
    """image id -> the detector on that image alone (one torch thread, as the tests: module-scoped fixtures are
    set up before function-scoped ones, and another thread count reorders float reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    predictor = Predictor(detector[0], TEST_RESIZE, max_batch=1)
    coco = load_coco(str(ANNOTATIONS))
    found = {}
    for record in coco.records:
        data = (IMAGE_DIR / record.file_name).read_bytes()
        (found[record.image_id],) = predictor(
            [decode_image(data, image_id=record.image_id, file_name=record.file_name)]
        )
    torch.set_num_threads(threads)
    shapes = {padded_shape(*IMAGES[i]["test"]["img_shape"], 32) for i in found}
    assert len(shapes) == len(found), "the photographs are chosen to pad to distinct shapes"
    return found


def _as_tensors(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.as_tensor(np.asarray(boxes, np.float64)).reshape(-1, 4),
        "scores": torch.as_tensor(np.asarray(scores, np.float64)),
        "labels": torch.as_tensor(np.asarray(labels, np.int64)),
    }


def _matches_mmdet(image_id: int, dets: dict[str, torch.Tensor]) -> None:
    matched, compared, _, _ = match(dets, IMAGES[image_id]["test"], iou_thr=0.9)
    assert compared > 0 and matched >= 0.8 * compared, f"image {image_id}: {matched} of {compared}"


@pytest.mark.timeout(300)
def test_evaluate_model_file_gives_the_detections_of_the_detector_alone(
    ray_cluster: S3Server, detector: tuple, alone: dict[int, Detections], tmp_path: Path
) -> None:
    net, cfg = detector
    path = tmp_path / "dh_r18.pt"
    save_model(path, net, cfg, meta={"resize": dataclasses.asdict(TEST_RESIZE)})
    data = DatasetSpec(annotations=str(ANNOTATIONS), images=str(IMAGE_DIR))
    metrics, results = evaluate_model(load_for_eval(str(path)), data, StorageConfig(), batch_size=4)
    assert metrics.num_images == len(alone)
    categories = load_coco(str(ANNOTATIONS)).categories  # label k = the k-th category by id
    for image_id, want in alone.items():
        mine = [r for r in results if r["image_id"] == image_id]
        assert mine == want.to_coco(image_id, categories), f"image {image_id}"
        _matches_mmdet(image_id, _as_tensors(want.boxes, want.scores, want.labels))


@pytest.mark.timeout(300)
def test_predict_gives_the_detections_of_the_detector_alone(
    ray_cluster: S3Server, detector: tuple, alone: dict[int, Detections], tmp_path: Path
) -> None:
    net, cfg = detector
    dataset = load_coco(str(ANNOTATIONS)).categories
    k = cfg.num_classes  # the model's labels 1..K are the dataset's first K categories by id
    categories = CategoryMap(dataset.category_ids[:k], dataset.names[:k])
    store = ensure_tracking_store(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    tracker = Tracker(store)
    tracker.start()
    model_uri, _ = tracker.log_detector(
        model=net, model_cfg=cfg, categories=categories, resize_cfg=TEST_RESIZE, metrics={}, training_config={}
    )
    tracker.end()
    result = run_predict(
        PredictConfig(
            model_uri=model_uri,
            images=str(IMAGE_DIR),
            out=str(tmp_path / "out"),
            annotations=str(ANNOTATIONS),
            tracking_uri=store.tracking_uri,
            batch_size=6,
        )
    )
    assert result.num_images == len(alone)
    for row in pq.read_table(tmp_path / "out" / "detections.parquet").to_pylist():
        want = alone[row["image_id"]]
        np.testing.assert_array_equal(np.reshape(row["boxes"], (-1, 4)), want.boxes.astype(np.float32))
        np.testing.assert_array_equal(row["scores"], want.scores)
        assert row["labels"] == want.labels.tolist()
        assert row["category_ids"] == [categories.category_id_of(k) for k in row["labels"]]
        _matches_mmdet(row["image_id"], _as_tensors(row["boxes"], row["scores"], row["labels"]))

"""Bad input to the detector: a ValueError naming the image index and the field."""

from __future__ import annotations

import pytest
import torch

from model import build_criterion, build_detector, model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("tiny", 3)


def _img(h=64, w=80):
    return torch.randint(0, 255, (3, h, w), dtype=torch.uint8)


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


GOOD = _target([[4.0, 4.0, 40.0, 30.0]], [1])


@pytest.mark.parametrize(
    ("images", "targets", "message"),
    [
        ([], None, r"images: expected a non-empty list"),
        ([_img(), torch.zeros(1, 64, 64, dtype=torch.uint8)], None, r"images\[1\]: expected shape \[3, H, W\]"),
        ([torch.zeros(64, 64, 3, dtype=torch.uint8)], None, r"images\[0\]: expected shape \[3, H, W\]"),
        ([torch.zeros(3, 64, 64, dtype=torch.int32)], None, r"images\[0\]: expected dtype uint8 or float"),
        ([torch.rand(3, 64, 64)], None, r"images\[0\]: float values lie in 0-1"),
        (
            [_img(), _img()],
            [GOOD, {"boxes": torch.zeros(2, 5), "labels": torch.ones(2, dtype=torch.int64)}],
            r"targets\[1\]\['boxes'\]: expected shape \[N, 4\]",
        ),
        ([_img()], [_target([[4.0, 4.0, 40.0, 30.0]], [4])], r"targets\[0\]\['labels'\]: values must lie in 1\.\.3"),
        ([_img()], [_target([[4.0, 4.0, 40.0, 30.0]], [0])], r"targets\[0\]\['labels'\]: values must lie in 1\.\.3"),
        ([_img()], [_target([[4.0, float("nan"), 40.0, 30.0]], [1])], r"targets\[0\]\['boxes'\]: contains NaN"),
        ([_img()], [_target([[4.0, 4.0, 40.0, 30.0]], [1, 2])], r"targets\[0\]\['labels'\]: expected shape \[1\]"),
        ([_img()], [_target([[40.0, 4.0, 4.0, 30.0]], [1])], r"targets\[0\]\['boxes'\]\[0\]: .* no positive width"),
        ([_img()], [_target([[100.0, 4.0, 140.0, 30.0]], [1])], r"targets\[0\]\['boxes'\]\[0\]: .* outside the 80x64"),
        ([_img()], [{"labels": torch.ones(1, dtype=torch.int64)}], r"targets\[0\]\['boxes'\]: missing"),
        ([_img(), _img()], [GOOD], r"targets: expected 2 dicts"),
    ],
)
def test_bad_input_raises_value_error(model, images, targets, message):
    model.train(targets is not None)
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_float_and_uint8_inputs_agree(model):
    model.eval()
    img = _img()
    with torch.no_grad():
        a = model([img])[0]
        b = model([img.float()])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


def test_images_without_boxes_train(model):
    model.train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    torch.manual_seed(0)
    losses = build_criterion(model_config("tiny", 3))(model([_img(), _img(96, 64)], [empty, empty]))
    total = sum(losses.values())
    assert torch.isfinite(total)
    assert losses["loss_rpn_bbox"].item() == 0.0 and losses["loss_bbox"].item() == 0.0
    total.backward()

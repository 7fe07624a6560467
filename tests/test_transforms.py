"""pipeline.transforms and pipeline.collate: resize/flip maths, seeded sampling, the model-facing batch format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.collate import collate, unscale_boxes
from pipeline.transforms import (
    AugmentConfig,
    ResizeConfig,
    eval_transform,
    hflip,
    image_rng,
    rescaled_size,
    resize,
    sample_min_size,
    train_transform,
)


@pytest.mark.parametrize(
    ("size", "min_size", "max_size", "expected"),
    [
        ((640, 480), 800, 1333, (1067, 800)),  # shorter side reaches 800
        ((480, 640), 800, 1333, (800, 1067)),
        ((2000, 500), 800, 1333, (1333, 333)),  # longer side capped: 500 * 0.6665 = 333.25
        ((1333, 800), 800, 1333, (1333, 800)),  # already there
        ((427, 640), 800, 1333, (800, 1199)),  # 640 * 800 / 427 = 1199.06
        ((1, 1), 800, 1333, (800, 800)),
        ((1, 3000), 800, 1333, (1, 1333)),  # width rounds to 0.44 -> kept at 1 px
    ],
)
def test_rescaled_size_follows_mmcv(size: tuple[int, int], min_size: int, max_size: int, expected: tuple) -> None:
    assert rescaled_size(*size, min_size, max_size) == expected


def test_resize_scales_pixels_and_boxes_per_axis() -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    image[:, :320] = (255, 0, 0)
    boxes = np.array([[0, 0, 640, 480], [10.5, 20.25, 100, 200]], np.float32)
    out, scaled, (sx, sy) = resize(image, boxes, 800, 1333)
    assert out.shape == (800, 1067, 3) and out.dtype == np.uint8
    assert (sx, sy) == (1067 / 640, 800 / 480)
    np.testing.assert_allclose(scaled[0], [0, 0, 1067, 800], atol=1e-4)
    np.testing.assert_allclose(scaled[1], [10.5 * sx, 20.25 * sy, 100 * sx, 200 * sy], rtol=1e-6)
    assert scaled.dtype == np.float32
    # Content is resampled, not cropped or padded: red stays on the left half.
    assert (out[:, :530, 0] == 255).all() and (out[:, 537:, 0] == 0).all()


def test_resize_without_boxes_and_identity_size() -> None:
    image = np.full((800, 1000, 3), 7, np.uint8)
    out, scaled, factors = resize(image, np.zeros((0, 4), np.float32), 800, 1333)
    assert out is image and scaled.shape == (0, 4) and factors == (1.0, 1.0)


def test_hflip_mirrors_pixels_and_boxes() -> None:
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    boxes = np.array([[0, 0, 2, 1], [1.5, 0, 5, 2]], np.float32)
    out, flipped = hflip(image, boxes)
    np.testing.assert_array_equal(out[:, 0], image[:, 4])
    np.testing.assert_array_equal(flipped, [[3, 0, 5, 1], [0, 0, 3.5, 2]])
    assert out.flags.c_contiguous
    back, unflipped = hflip(out, flipped)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(unflipped, boxes)


def test_flip_is_seeded_per_image_and_epoch() -> None:
    image = np.zeros((20, 30, 3), np.uint8)
    boxes = np.array([[1, 2, 5, 6]], np.float32)
    config = AugmentConfig(resize=ResizeConfig(train_min_sizes=(20,), test_min_size=20, max_size=100))

    def flips(seed: int, epoch: int) -> list[bool]:
        return [train_transform(image, boxes, config, image_rng(seed, epoch, i)).flipped for i in range(400)]

    epoch0 = flips(0, 0)
    assert epoch0 == flips(0, 0)  # reproducible
    assert epoch0 != flips(0, 1) and epoch0 != flips(1, 0)  # differs across epochs and seeds
    assert 150 < sum(epoch0) < 250  # p = 0.5: 400 draws lie within 5 standard deviations of 200
    never = AugmentConfig(resize=config.resize, flip_prob=0.0)
    always = AugmentConfig(resize=config.resize, flip_prob=1.0)
    assert not any(train_transform(image, boxes, never, image_rng(0, 0, i)).flipped for i in range(50))
    assert all(train_transform(image, boxes, always, image_rng(0, 0, i)).flipped for i in range(50))


def test_multiscale_choice_and_range() -> None:
    choice = ResizeConfig(train_min_sizes=(640, 672, 704, 736, 768, 800))
    drawn = {sample_min_size(choice, image_rng(0, 0, i)) for i in range(300)}
    assert drawn == set(choice.train_min_sizes)
    ranged = ResizeConfig(train_min_sizes=(640, 800), sample_style="range")
    values = [sample_min_size(ranged, image_rng(0, 0, i)) for i in range(3000)]
    assert min(values) == 640 and max(values) == 800 and len(set(values)) > 120


def test_train_transform_resizes_to_the_sampled_scale_then_flips() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    boxes = np.array([[10, 10, 50, 40]], np.float32)
    config = AugmentConfig(resize=ResizeConfig(train_min_sizes=(50, 80), max_size=1000), flip_prob=1.0)
    out = train_transform(image, boxes, config, image_rng(3, 1, 42))
    short = out.image.shape[0]
    assert short in (50, 80) and out.image.shape[1] == 2 * short and out.flipped
    s = short / 100
    np.testing.assert_allclose(out.boxes[0], [(200 - 50) * s, 10 * s, (200 - 10) * s, 40 * s], rtol=1e-6)


def test_eval_transform_is_deterministic_and_unflipped() -> None:
    image = np.zeros((300, 400, 3), np.uint8)
    out = eval_transform(image, np.zeros((0, 4), np.float32), ResizeConfig(test_min_size=600, max_size=1000))
    assert out.image.shape == (600, 800, 3) and not out.flipped and out.scale_factor == (2.0, 2.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"train_min_sizes": ()},
        {"train_min_sizes": (0,)},
        {"train_min_sizes": (800, 640), "sample_style": "range"},
        {"sample_style": "uniform"},
        {"max_size": 0},
    ],
)
def test_resize_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="resize"):
        ResizeConfig(**kwargs)


def test_augment_config_rejects_bad_probability() -> None:
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)


def _stream_batch(transformed: list, ids: list[int], sizes: list[tuple[int, int]], labels: list) -> dict:
    return {
        "image_id": np.array(ids, np.int64),
        "image": [t.image for t in transformed],
        "boxes": [t.boxes.reshape(-1) for t in transformed],
        "labels": [np.asarray(lab, np.int32) for lab in labels],
        "orig_width": np.array([w for w, _ in sizes], np.int32),
        "orig_height": np.array([h for _, h in sizes], np.int32),
        "scale_x": np.array([t.scale_factor[0] for t in transformed]),
        "scale_y": np.array([t.scale_factor[1] for t in transformed]),
        "flipped": np.array([t.flipped for t in transformed]),
    }


def test_collate_builds_the_model_contract_and_unscale_inverts_the_transform() -> None:
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (333, 517), (1, 1)]
    originals, transformed, labels = [], [], []
    for k, (w, h) in enumerate(sizes):
        config = AugmentConfig(resize=ResizeConfig(train_min_sizes=(600, 800)), flip_prob=float(k % 2 == 0))
        n = 3 - k
        xy = rng.uniform(0, 1, (n, 2)) * (w, h)
        wh = rng.uniform(0, 1, (n, 2)) * ((w, h) - xy)
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        originals.append(boxes)
        labels.append(np.arange(1, n + 1))
        transformed.append(train_transform(np.zeros((h, w, 3), np.uint8), boxes, config, image_rng(0, 0, k + 1)))
    assert [t.flipped for t in transformed] == [True, False, True]

    images, targets = collate(_stream_batch(transformed, [11, 12, 13], sizes, labels))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    for img, target, t, (w, h), boxes in zip(images, targets, transformed, sizes, originals, strict=True):
        assert img.dtype == torch.uint8 and img.shape == (3, *t.image.shape[:2])
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), t.image)
        assert not np.shares_memory(img.numpy(), t.image)  # a private copy: safe to modify in place
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(boxes), 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].min() >= 1
        assert target["image_id"].dtype == torch.int64 and target["image_id"].dim() == 0
        assert target["orig_size"].tolist() == [h, w] and target["orig_size"].dtype == torch.int64
        assert target["scale_factor"].dtype == torch.float32 and target["flipped"].dtype == torch.bool
        np.testing.assert_allclose(unscale_boxes(target["boxes"], target).numpy(), boxes, atol=1e-3)
    assert [int(t["image_id"]) for t in targets] == [11, 12, 13]
    assert "iscrowd" not in targets[0]


def test_collate_rejects_inconsistent_rows() -> None:
    t = eval_transform(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4), np.float32), ResizeConfig(test_min_size=4))
    batch = _stream_batch([t], [1], [(4, 4)], [[1]])  # 2 boxes, 1 label
    with pytest.raises(ValueError, match="image id 1: 2 boxes but 1 labels"):
        collate(batch)
    del batch["scale_x"]
    with pytest.raises(KeyError, match="scale_x"):
        collate(batch)

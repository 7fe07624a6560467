"""Geometric transforms for detection: aspect-preserving resize, multi-scale sampling, horizontal flip.

Images are RGB uint8 ``[H, W, 3]`` in and out; boxes are float32 ``[N, 4]`` ``(x1, y1, x2, y2)`` in absolute
pixels of the image they accompany (continuous coordinates: the image spans ``[0, W] x [0, H]``).

The resize follows mmdetection's ``Resize(keep_ratio=True)`` (mmcv ``rescale_size``)::

    scale = min(max_size / long_side, min_size / short_side)
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)

and scales boxes by the per-axis factors ``(sx, sy) = (new_w / w, new_h / h)`` (which differ from ``scale``
by the rounding). Pixels are resampled with Pillow's ``BILINEAR`` filter on uint8, as detectron2's
``ResizeShortestEdge`` does. Pillow was chosen over OpenCV: it is already a dependency, it antialiases when
downscaling, and it does not start its own thread pool to fight Ray's one-CPU tasks on small machines.

Randomness never comes from a global RNG: :func:`image_rng` derives a generator from an explicit
``(seed, epoch, image_id)``, so every image's augmentation is reproducible on its own, in any worker and in any
order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ResizeConfig:
    """Aspect-preserving resize.

    Attributes:
        train_min_sizes: candidate shorter sides for training. One value is the fixed single-scale setting
            (800); several enable multi-scale training, sampled per image according to ``sample_style``.
        sample_style: ``"choice"``: pick one of ``train_min_sizes``; ``"range"``: ``train_min_sizes`` is
            ``(lo, hi)`` and the shorter side is drawn uniformly from the integers in ``[lo, hi]``.
        test_min_size: shorter side for evaluation.
        max_size: upper bound on the longer side, applied to training and evaluation.
    """

    train_min_sizes: tuple[int, ...] = (800,)
    sample_style: Literal["choice", "range"] = "choice"
    test_min_size: int = 800
    max_size: int = 1333

    def __post_init__(self) -> None:
        sizes = tuple(self.train_min_sizes)
        if not sizes or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"resize.train_min_sizes: expected positive integers, got {self.train_min_sizes}")
        if self.sample_style not in ("choice", "range"):
            raise ValueError(f"resize.sample_style: expected 'choice' or 'range', got {self.sample_style!r}")
        if self.sample_style == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
            raise ValueError(f"resize.train_min_sizes: 'range' needs (lo, hi) with lo <= hi, got {sizes}")
        if self.test_min_size <= 0 or self.max_size <= 0:
            raise ValueError(
                f"resize: test_min_size and max_size must be positive, got {self.test_min_size}, {self.max_size}"
            )
        object.__setattr__(self, "train_min_sizes", tuple(int(s) for s in sizes))


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: multi-scale resize then random horizontal flip.

    Attributes:
        resize: the resize settings (also used, without flip, for evaluation).
        flip_prob: probability of a horizontal flip per image and epoch.
    """

    resize: ResizeConfig = ResizeConfig()
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"augment.flip_prob: expected a probability in [0, 1], got {self.flip_prob}")


@dataclass(frozen=True)
class Transformed:
    """One transformed image and its boxes.

    Attributes:
        image: uint8 ``[h, w, 3]`` RGB, C-contiguous, resized (and flipped if ``flipped``).
        boxes: float32 ``[N, 4]`` xyxy in pixels of ``image``.
        scale_factor: ``(sx, sy)`` = ``(w / W, h / H)`` from the original ``W x H`` image.
        flipped: whether ``image`` and ``boxes`` were flipped horizontally after resizing.
    """

    image: np.ndarray
    boxes: np.ndarray
    scale_factor: tuple[float, float]
    flipped: bool


def image_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """A generator determined only by ``(seed, epoch, image_id)`` (non-negative parts of a SeedSequence)."""
    return np.random.default_rng([int(seed) % 2**63, int(epoch) % 2**63, int(image_id) % 2**63])


def rescaled_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(new_w, new_h)`` with the shorter side at ``min_size`` unless the longer side would exceed
    ``max_size`` (mmcv ``rescale_size`` rounding); never smaller than 1 pixel."""
    scale = min(max_size / max(width, height), min_size / min(width, height))
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def resize(
    image: np.ndarray, boxes: np.ndarray, min_size: int, max_size: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Resize uint8 ``[H, W, 3]`` ``image`` keeping its aspect ratio; scale float32 ``[N, 4]`` xyxy ``boxes``.

    Returns ``(image [h, w, 3] uint8, boxes [N, 4] float32, (sx, sy))`` with ``sx = w / W``, ``sy = h / H``.
    """
    out = _geometric(image, min_size, max_size, flip=False)
    height, width = image.shape[:2]
    factors = (out.shape[1] / width, out.shape[0] / height)
    return out, _scale_boxes(boxes, factors), factors


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror uint8 ``[H, W, 3]`` ``image`` left-right and float32 ``[N, 4]`` xyxy ``boxes`` with it
    (``x1' = W - x2``, ``x2' = W - x1``). Returns a C-contiguous copy of the image."""
    height, width = image.shape[:2]
    return _geometric(image, min(height, width), max(height, width), flip=True), _flip_boxes(boxes, width)


def _geometric(image: np.ndarray, min_size: int, max_size: int, *, flip: bool) -> np.ndarray:
    """Resize then optionally flip in Pillow (one conversion in, one out: a numpy flip of a reversed view
    costs several times Pillow's ``transpose``)."""
    height, width = image.shape[:2]
    new_size = rescaled_size(width, height, min_size, max_size)
    if new_size == (width, height) and not flip:
        return image
    pil = Image.fromarray(image)
    if new_size != (width, height):
        pil = pil.resize(new_size, Image.Resampling.BILINEAR)
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(pil)


def _scale_boxes(boxes: np.ndarray, factors: tuple[float, float]) -> np.ndarray:
    sx, sy = factors
    scaled = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])
    return scaled.astype(np.float32)


def _flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def sample_min_size(config: ResizeConfig, rng: np.random.Generator) -> int:
    """Draw one training shorter side from ``config`` (always one draw from ``rng``, even single-scale, so
    the flip decision that follows does not depend on the number of scales)."""
    sizes = config.train_min_sizes
    if config.sample_style == "range":
        return int(rng.integers(sizes[0], sizes[1], endpoint=True))
    return int(sizes[int(rng.integers(len(sizes)))])


def train_transform(
    image: np.ndarray, boxes: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> Transformed:
    """Multi-scale resize then flip with probability ``config.flip_prob``; both drawn from ``rng``.

    ``image`` uint8 ``[H, W, 3]``; ``boxes`` float32 ``[N, 4]`` xyxy in its pixels.
    """
    min_size = sample_min_size(config.resize, rng)
    do_flip = bool(rng.random() < config.flip_prob)
    out = _geometric(image, min_size, config.resize.max_size, flip=do_flip)
    height, width = image.shape[:2]
    factors = (out.shape[1] / width, out.shape[0] / height)
    scaled = _scale_boxes(boxes, factors)
    if do_flip:
        scaled = _flip_boxes(scaled, out.shape[1])
    return Transformed(out, scaled, factors, do_flip)


def eval_transform(image: np.ndarray, boxes: np.ndarray, config: ResizeConfig) -> Transformed:
    """Deterministic resize to ``config.test_min_size`` (longer side <= ``max_size``), no flip."""
    resized, scaled, factors = resize(image, boxes, config.test_min_size, config.max_size)
    return Transformed(resized, scaled, factors, False)

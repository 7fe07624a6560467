"""A synthetic COCO-format detection dataset of coloured shapes, deterministic by seed.

Three classes with non-contiguous category ids (to exercise the id <-> label mapping): ``rectangle`` (id 1,
red), ``ellipse`` (id 3, green), ``triangle`` (id 7, blue), with per-object colour jitter, sizes from 8 px to
60 % of the shorter image side (log-uniform), aspect ratios 1:2..2:1 and partial overlaps, on textured
backgrounds (low-frequency colour noise, stripes, grey distractor strokes, pixel noise). About
``empty_fraction`` of the images have no object. Images are small (256x192..320x256 by default) so that a
ResNet-18 detector learns the task on a CPU.

Layout written under ``out`` (local path or ``s3://``)::

    out/annotations/instances_train.json    COCO instances; image ids unique across splits
    out/annotations/instances_val.json
    out/images/train/000001.jpg ...          file_name in the JSON is relative to out/images/<split>
    out/images/val/...

Image ``i`` (0-based, id ``i + 1``) depends only on ``(seed, i)``; the split is a seeded permutation. Boxes are
``[x, y, w, h]`` tight to the drawn pixels (within 1 px); ``area`` is the shape's geometric area. Annotation
files are written after the images, so an interrupted run never leaves a JSON pointing at missing images.
"""

from __future__ import annotations

import io
import json
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage


@dataclass(frozen=True)
class ShapeClass:
    category_id: int
    name: str
    colour: tuple[int, int, int]


SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass(1, "rectangle", (215, 48, 39)),
    ShapeClass(3, "ellipse", (26, 152, 80)),
    ShapeClass(7, "triangle", (49, 54, 199)),
)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. ``size``: every image exactly ``(W, H)``; ``None``: random in ``min_size..max_size``."""

    num_images: int
    seed: int = 0
    val_fraction: float = 0.2
    size: tuple[int, int] | None = None
    min_size: tuple[int, int] = (256, 192)
    max_size: tuple[int, int] = (320, 256)
    empty_fraction: float = 0.1
    max_objects: int = 6
    min_object_size: int = 8
    max_overlap: float = 0.4  # fraction of an earlier object that a new one may cover
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"SynthConfig.num_images must be >= 1, got {self.num_images}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"SynthConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"SynthConfig.image_format must be 'jpg' or 'png', got {self.image_format!r}")
        lo, hi = self.size or self.min_size, self.size or self.max_size
        if min(lo) < 4 * self.min_object_size or lo[0] > hi[0] or lo[1] > hi[1]:
            raise ValueError(f"SynthConfig: image sizes {lo}..{hi} must be >= {4 * self.min_object_size} px")


@dataclass(frozen=True)
class SynthObject:
    category_id: int
    bbox: tuple[int, int, int, int]  # COCO [x, y, w, h], pixels
    area: float


@dataclass(frozen=True)
class SynthImage:
    pixels: np.ndarray  # uint8 [H, W, 3] RGB
    objects: tuple[SynthObject, ...]


@dataclass(frozen=True)
class SplitSummary:
    split: str
    annotations_uri: str
    images_uri: str
    num_images: int
    num_annotations: int
    num_empty_images: int
    per_category: dict[str, int] = field(default_factory=dict)


def render(index: int, config: SynthConfig) -> SynthImage:
    """Image ``index`` of the dataset: its RGB pixels and the objects drawn on it."""
    rng = np.random.default_rng([config.seed, index])
    if config.size is not None:
        width, height = config.size
    else:
        width = int(rng.integers(config.min_size[0], config.max_size[0] + 1))
        height = int(rng.integers(config.min_size[1], config.max_size[1] + 1))
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):  # unannotated grey strokes: the detector must ignore them
        grey = int(rng.integers(70, 190))
        pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(3)]
        draw.line(pts, fill=(grey, grey, grey), width=int(rng.integers(1, 4)))

    objects: list[SynthObject] = []
    n_objects = 0 if rng.random() < config.empty_fraction else int(rng.integers(1, config.max_objects + 1))
    for _ in range(n_objects):
        placed = _place(rng, width, height, [o.bbox for o in objects], config)
        if placed is None:
            continue
        cls = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        x, y, w, h = placed
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in cls.colour)
        outline = tuple(max(c - 60, 0) for c in colour)
        x1, y1 = x + w - 1, y + h - 1  # PIL shapes include both end pixels
        if cls.name == "rectangle":
            draw.rectangle([x, y, x1, y1], fill=colour, outline=outline)
            area = float(w * h)
        elif cls.name == "ellipse":
            draw.ellipse([x, y, x1, y1], fill=colour, outline=outline)
            area = math.pi / 4 * w * h
        else:
            draw.polygon(_triangle(rng, x, y, x1, y1), fill=colour, outline=outline)
            area = w * h / 2
        objects.append(SynthObject(cls.category_id, (x, y, w, h), area))

    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 4.0, (height, width, 3))
    return SynthImage(np.clip(pixels, 0, 255).astype(np.uint8), tuple(objects))


def split_indices(config: SynthConfig) -> dict[str, list[int]]:
    """``{"train": [...], "val": [...]}``: image indices per split, a seeded permutation, each sorted."""
    n = config.num_images
    n_val = min(max(round(n * config.val_fraction), 1 if config.val_fraction > 0 and n > 1 else 0), n - 1)
    perm = np.random.default_rng(config.seed).permutation(n)
    return {"train": sorted(int(i) for i in perm[n_val:]), "val": sorted(int(i) for i in perm[:n_val])}


def write_synth(
    out_uri: str,
    config: SynthConfig,
    storage_config: storage.StorageConfig | None = None,
    *,
    io_threads: int = 8,
    on_image: Callable[[int], None] | None = None,
) -> list[SplitSummary]:
    """Render and write the dataset under ``out_uri`` (layout in the module docstring); one summary per split.

    Rendering runs on this thread; uploads overlap with it on ``io_threads`` threads. ``on_image(n)`` is called
    after each image is rendered with the number rendered so far (progress).
    """
    fs, _ = storage.resolve(out_uri, storage_config)
    next_ann_id = 1
    rendered = 0
    summaries = []
    for split, indices in split_indices(config).items():
        if not indices:
            continue
        images_uri = storage.join(out_uri, "images", split)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max_workers=io_threads) as pool:
            pending: deque[Future[None]] = deque()
            for index in indices:
                sample = render(index, config)
                image_id = index + 1
                file_name = f"{image_id:06d}.{config.image_format}"
                height, width = sample.pixels.shape[:2]
                images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
                for obj in sample.objects:
                    annotations.append(
                        {
                            "id": next_ann_id,
                            "image_id": image_id,
                            "category_id": obj.category_id,
                            "bbox": list(obj.bbox),
                            "area": round(obj.area, 2),
                            "iscrowd": 0,
                        }
                    )
                    next_ann_id += 1
                uri = storage.join(images_uri, file_name)
                data = _encode(sample.pixels, config)
                pending.append(pool.submit(storage.write_bytes, uri, data, storage_config, filesystem=fs))
                while len(pending) > 4 * io_threads:
                    pending.popleft().result()
                rendered += 1
                if on_image is not None:
                    on_image(rendered)
            for fut in pending:
                fut.result()
        annotations_uri = storage.join(out_uri, "annotations", f"instances_{split}.json")
        doc = {
            "info": {"description": "dhrcnn synthetic shapes", "seed": config.seed, "split": split},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES],
        }
        storage.write_bytes(annotations_uri, json.dumps(doc).encode(), storage_config, filesystem=fs)
        summaries.append(_summary(split, annotations_uri, images_uri, images, annotations))
    return summaries


def _summary(
    split: str, annotations_uri: str, images_uri: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> SplitSummary:
    names = {c.category_id: c.name for c in SHAPE_CLASSES}
    per_category = dict.fromkeys(names.values(), 0)
    for ann in annotations:
        per_category[names[ann["category_id"]]] += 1
    n_empty = len(images) - len({a["image_id"] for a in annotations})
    return SplitSummary(split, annotations_uri, images_uri, len(images), len(annotations), n_empty, per_category)


def _encode(pixels: np.ndarray, config: SynthConfig) -> bytes:
    buf = io.BytesIO()
    if config.image_format == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=config.jpeg_quality)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3]: a muted base colour, low-frequency colour blobs and faint stripes."""
    base = rng.uniform(70, 185) + rng.uniform(-20, 20, 3)
    grid = rng.normal(0.0, 28.0, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
    lowres = Image.fromarray(np.clip(grid + 128, 0, 255).astype(np.uint8))
    blobs = np.asarray(lowres.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    stripes = rng.uniform(0, 12) * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return np.clip(base + blobs + stripes[..., None], 0, 255).astype(np.uint8)


def _place(
    rng: np.random.Generator,
    width: int,
    height: int,
    existing: list[tuple[int, int, int, int]],
    config: SynthConfig,
    tries: int = 20,
) -> tuple[int, int, int, int] | None:
    """A box ``(x, y, w, h)`` inside the image covering at most ``max_overlap`` of any existing box."""
    smin, smax = math.log(config.min_object_size), math.log(0.6 * min(width, height))
    for _ in range(tries):
        side, aspect = math.exp(rng.uniform(smin, smax)), math.exp(rng.uniform(-math.log(2), math.log(2)))
        w = int(np.clip(round(side * math.sqrt(aspect)), config.min_object_size, width - 1))
        h = int(np.clip(round(side / math.sqrt(aspect)), config.min_object_size, height - 1))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(_covered(e, (x, y, w, h)) <= config.max_overlap for e in existing):
            return x, y, w, h
    return None


def _covered(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Fraction of box ``a`` (xywh) covered by box ``b``."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0) / (a[2] * a[3])


def _triangle(rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """A triangle whose bounding box is exactly ``[x0, x1] x [y0, y1]``, apex on a random side."""
    t = float(rng.uniform(0.0, 1.0))
    side = int(rng.integers(4))
    if side == 0:  # apex on top
        return [(round(x0 + t * (x1 - x0)), y0), (x0, y1), (x1, y1)]
    if side == 1:  # apex at the bottom
        return [(round(x0 + t * (x1 - x0)), y1), (x0, y0), (x1, y0)]
    if side == 2:  # apex on the left
        return [(x0, round(y0 + t * (y1 - y0))), (x1, y0), (x1, y1)]
    return [(x1, round(y0 + t * (y1 - y0))), (x0, y0), (x0, y1)]

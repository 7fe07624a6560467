"""Driver memory and time of loading a COCO instances JSON: the streamed ``load_coco`` vs the whole-file parse.

A synthetic instances file of about ``--mb`` MB is written to a temporary directory, shaped like COCO's
(``info``/``licenses``/``images``/``annotations``/``categories``, ~120k images and ~800k annotations with
polygon segmentations at 200 MB, categories last as in COCO's own files). Each variant then loads it in a fresh
child process, whose RSS high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``) is read after the imports and
after the load; the difference is the memory the load took, result records included:

* ``whole``: what ``pipeline.coco`` did before it streamed: read the bytes, ``json.loads``, one Python list of
  per-annotation tuples per image, then the numpy arrays of each record (:func:`_whole_file_load`, kept here as
  the baseline);
* ``stream``: :func:`pipeline.coco.load_coco`.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/annotations_memory.py --mb 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

VARIANTS = ("whole", "stream")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="size of the generated file, MB (default 200)")
    parser.add_argument("--repeats", type=int, default=1, help="loads per variant, alternating; best time counts")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(args.measure, args.path)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "instances.json")
        t0 = time.perf_counter()
        counts = write_instances(path, args.mb)
        size = os.path.getsize(path)
        print(
            f"# {path}: {size / 1e6:.1f} MB, {counts['images']} images, {counts['annotations']} annotations, "
            f"{counts['categories']} categories (written in {time.perf_counter() - t0:.0f}s)"
        )
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                runs[variant].append(_child(variant, path))
        results = {
            v: {"rss": max(x["rss_mib"] for x in rs), "s": min(x["seconds"] for x in rs)} for v, rs in runs.items()
        }
        if runs["whole"][0]["summary"] != runs["stream"][0]["summary"]:
            raise RuntimeError(f"the variants disagree: {runs['whole'][0]['summary']} {runs['stream'][0]['summary']}")
        mib = size / 2**20
        print(f"{'variant':>8} {'peak RSS growth MiB':>20} {'/ file size':>12} {'seconds':>8}")
        for variant, res in results.items():
            print(f"{variant:>8} {res['rss']:>20.0f} {res['rss'] / mib:>12.2f} {res['s']:>8.2f}")
        whole, stream = results["whole"], results["stream"]
        print(
            f"# stream / whole: memory {stream['rss'] / whole['rss']:.2f}x, time {stream['s'] / whole['s']:.2f}x; "
            f"{runs['stream'][0]['summary']}"
        )
    return 0


def write_instances(path: str, mb: float, seed: int = 0) -> dict[str, int]:
    """Write a COCO-shaped instances file of about ``mb`` MB to ``path``, one element at a time."""
    rng = random.Random(seed)
    n_images = max(10, int(600 * mb))
    counts = {"images": n_images, "annotations": 0, "categories": 80}
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic", "version": "1.0", "year": 2026}, "licenses": [{"id": 1, ')
        f.write('"name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}], "images": [')
        for i in range(1, n_images + 1):
            width, height = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
            image = {
                "license": 1,
                "file_name": f"{i:012d}.jpg",
                "coco_url": f"http://images.example.org/train/{i:012d}.jpg",
                "height": height,
                "width": width,
                "date_captured": "2013-11-14 11:18:45",
                "id": i,
            }
            f.write(("," if i > 1 else "") + json.dumps(image))
        f.write('], "annotations": [')
        for i in range(1, n_images + 1):
            for _ in range(rng.randint(0, 12)):
                counts["annotations"] += 1
                f.write(("," if counts["annotations"] > 1 else "") + json.dumps(_annotation(rng, counts, i)))
        f.write('], "categories": [')
        cats = [{"supercategory": f"group{c // 10}", "id": c, "name": f"class{c}"} for c in range(1, 81)]
        f.write(",".join(json.dumps(c) for c in cats) + "]}")
    return counts


def _annotation(rng: random.Random, counts: dict[str, int], image_id: int) -> dict[str, Any]:
    x, y = round(rng.uniform(-5, 600), 2), round(rng.uniform(-5, 420), 2)
    w, h = round(rng.uniform(0.5, 250), 2), round(rng.uniform(0.5, 250), 2)
    n = rng.randint(4, 16)
    polygon = []
    for k in range(n):
        angle = 2 * math.pi * k / n
        polygon += [round(x + w / 2 * (1 + math.cos(angle)), 2), round(y + h / 2 * (1 + math.sin(angle)), 2)]
    return {
        "segmentation": [polygon],
        "area": round(w * h * 0.7, 4),
        "iscrowd": int(rng.random() < 0.01),
        "image_id": image_id,
        "bbox": [x, y, w, h],
        "category_id": rng.randint(1, 80),
        "id": counts["annotations"],
    }


def _child(variant: str, path: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", variant, "--path", path]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(variant: str, path: str) -> dict[str, Any]:
    import numpy  # noqa: F401  (imports before the baseline)

    from pipeline.coco import load_coco

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    records, fingerprint = _whole_file_load(path) if variant == "whole" else _streamed_load(load_coco, path)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    boxes = sum(len(r.labels) for r in records)
    return {
        "rss_mib": (after - before) / 1024,  # ru_maxrss is in KiB on Linux
        "seconds": seconds,
        "summary": f"{len(records)} records, {boxes} boxes, sha256 {fingerprint[:12]}",
    }


def _streamed_load(load_coco: Any, path: str) -> tuple[tuple, str]:
    data = load_coco(path)
    return data.records, data.fingerprint


def _whole_file_load(path: str) -> tuple[list, str]:
    """The former ``load_coco``, checks trimmed to the ones that shape memory: bytes, ``json.loads``, lists."""
    import numpy as np

    from pipeline.coco import ImageRecord

    with open(path, "rb") as f:
        data = f.read()
    doc = json.loads(data)
    categories = sorted(c["id"] for c in doc["categories"])
    label_of = {cid: i + 1 for i, cid in enumerate(categories)}
    images = {img["id"]: (img["file_name"], img["width"], img["height"]) for img in doc["images"]}
    per_image: dict[int, list[tuple[list[float], int, bool, float]]] = {iid: [] for iid in images}
    for ann in doc["annotations"]:
        _, width, height = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w < 0 or h < 0 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
            continue
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue
        area = ann.get("area")
        area = float(area) if isinstance(area, int | float) else (x2 - x1) * (y2 - y1)
        per_image[ann["image_id"]].append(([x1, y1, x2, y2], label_of[ann["category_id"]], bool(ann["iscrowd"]), area))
    records = []
    for image_id in sorted(images):
        anns = per_image[image_id]
        file_name, width, height = images[image_id]
        records.append(
            ImageRecord(
                image_id=image_id,
                file_name=file_name,
                width=width,
                height=height,
                boxes=np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                labels=np.array([a[1] for a in anns], dtype=np.int32),
                iscrowd=np.array([a[2] for a in anns], dtype=bool),
                area=np.array([a[3] for a in anns], dtype=np.float32),
            )
        )
    return records, hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    sys.exit(main())

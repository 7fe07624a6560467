"""Evaluation throughput: the Predictor (batches of one padded shape) vs the batching it replaced (every image of
a stream batch padded to the largest), and one image per forward pass; with how far each moves detections.

    PYTHONPATH=. python benchmarks/predictor.py                          # dh_r50_fpn, 512/853 resize, 24 images
    PYTHONPATH=. python benchmarks/predictor.py --preset tiny --images 48
    PYTHONPATH=. python benchmarks/predictor.py --device cuda --min-size 800 --max-size 1333 --images 200 --amp

Images: random pictures with the sizes of COCO val2017's most common shapes (640x480, 480x640, 640x427, 427x640,
612x612, 500x375, 640x360, 375x500, 640x512, 333x500), in a fixed shuffled order, resized with the evaluation
resize as ``dhrcnn evaluate`` does. Random weights (nothing is downloaded); score threshold 0 so that every
image keeps its 100 detections. Each mode runs ``--rounds`` times over all images in rotating order (a changing
load hits every mode alike); images/s = images / median round time. "moved" = the largest |Δscore| of an image's
top detections against one image per pass (the exact answer). The last line is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from jobs.denormals import flush_denormals
from jobs.evaluate.predictor import Detections, Predictor
from model.build import build_model
from model.config import model_config
from pipeline.collate import unscale_boxes
from pipeline.transforms import ResizeConfig

COCO_SHAPES = [(480, 640), (640, 480), (427, 640), (640, 427), (612, 612), (375, 500), (360, 640), (500, 375)]
COCO_SHAPES += [(512, 640), (500, 333)]  # (h, w)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="dh_r50_fpn", help="model preset (tiny: a small ResNet-18 FPN)")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch", type=int, default=4, help="images per stream batch and per forward pass, at most")
    p.add_argument("--min-size", type=int, default=512, help="evaluation resize: shorter side")
    p.add_argument("--max-size", type=int, default=853, help="evaluation resize: longer side at most")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args(argv)


def _padded_batches(
    detector: torch.nn.Module, inputs: list[tuple[torch.Tensor, dict]], batch: int, device: torch.device, amp: bool
) -> list[Detections]:
    """What evaluation did before the Predictor: each stream batch in one pass, padded to its largest image."""
    found = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for k in range(0, len(inputs), batch):
            chunk = inputs[k : k + batch]
            outputs = detector([img.to(device) for img, _ in chunk])
            for out, (_, target) in zip(outputs, chunk, strict=True):
                boxes = unscale_boxes(out["boxes"].float().cpu(), target, dtype=torch.float64).numpy()
                found.append(Detections(boxes, out["scores"].float().cpu().numpy(), out["labels"].cpu().numpy()))
    return found


def _moved(found: list[Detections], exact: list[Detections], top: int = 10) -> float:
    """Largest |Δscore| over the ``top`` best detections of each image (0 when identical)."""
    worst = 0.0
    for a, b in zip(found, exact, strict=True):
        n = min(top, len(a.scores), len(b.scores))
        worst = max(worst, float(np.abs(a.scores[:n] - b.scores[:n]).max()) if n else 0.0)
    return worst


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    flush_denormals()
    device = torch.device(args.device)
    torch.manual_seed(0)
    detector = build_model(model_config(args.preset, 80, roi_head={"score_thresh": 0.0})).to(device).eval()
    resize = ResizeConfig(train_min_sizes=(args.min_size,), test_min_size=args.min_size, max_size=args.max_size)
    rng = np.random.default_rng(0)
    shapes = [COCO_SHAPES[i] for i in rng.integers(0, len(COCO_SHAPES), args.images)]
    small = [rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8) for h, w in shapes]
    photos = [np.kron(s, np.ones((16, 16, 1), np.uint8)) for s in small]  # smooth-ish pictures
    amp = torch.bfloat16 if args.amp else None
    grouped = Predictor(detector, resize, device=device, amp_dtype=amp, max_batch=args.batch)
    single = Predictor(detector, resize, device=device, amp_dtype=amp, max_batch=1)
    inputs = [grouped.preprocess(photo) for photo in photos]
    stream = [
        ([img for img, _ in inputs[k : k + args.batch]], [t for _, t in inputs[k : k + args.batch]])
        for k in range(0, len(inputs), args.batch)
    ]

    def run_grouped() -> list[Detections]:
        by_id = {id(t): d for _, t, d in grouped.detect_stream(stream)}
        return [by_id[id(t)] for _, t in inputs]

    modes: dict[str, Callable[[], list[Detections]]] = {
        "padded_to_largest (before)": lambda: _padded_batches(detector, inputs, args.batch, device, args.amp),
        "grouped_by_padded_shape (Predictor)": run_grouped,
        "one_per_pass": lambda: single.detect([img for img, _ in inputs], [t for _, t in inputs]),
    }
    for run in modes.values():  # warm-up: allocator, oneDNN primitive caches
        run()
    times: dict[str, list[float]] = {name: [] for name in modes}
    results: dict[str, list[Detections]] = {}
    names = list(modes)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = modes[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    exact = results["one_per_pass"]
    padded_shapes = {tuple(-(-s // 32) * 32 for s in img.shape[-2:]) for img, _ in inputs}
    print(
        f"{args.preset}, {args.images} images ({len(padded_shapes)} padded shapes), resize {args.min_size}/"
        f"{args.max_size}, batch {args.batch}, {args.device}{' bf16' if args.amp else ''}, {args.threads} threads"
    )
    base = statistics.median(times[names[0]])
    report = {}
    for name in names:
        t = statistics.median(times[name])
        moved = _moved(results[name], exact)
        report[name] = {"images_per_s": args.images / t, "vs_before": base / t, "max_score_moved": moved}
        print(f"  {name:38s} {args.images / t:7.3f} images/s  x{base / t:5.2f}  max |Δscore| of top-10 {moved:.2e}")
    print("BENCH_JSON " + json.dumps({"args": vars(args), "results": report}))


if __name__ == "__main__":
    main()

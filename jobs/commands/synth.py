"""``dhrcnn synth --out URI --images N --seed S``: write a synthetic COCO dataset of shapes (train + val)."""

from __future__ import annotations

import argparse


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 320x256, got {text!r}") from None
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output root, local path or s3://bucket/prefix")
    parser.add_argument("--images", type=int, required=True, help="number of images, both splits together")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a function of the seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images in val (default 0.2)")
    parser.add_argument(
        "--size", type=_size, default=None, help="fixed image size WxH (default: random in 256x192..320x256)"
    )
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding (default jpg)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    from pipeline.storage import StorageConfig
    from pipeline.synth import SynthConfig, write_synth

    config = SynthConfig(
        num_images=args.images,
        seed=args.seed,
        val_fraction=args.val_fraction,
        size=args.size,
        image_format=args.format,
    )
    summaries = write_synth(args.out, config, StorageConfig(endpoint_url=args.endpoint_url))
    for s in summaries:
        per_class = ", ".join(f"{name} {n}" for name, n in s.per_category.items())
        print(
            f"{s.split}: {s.num_images} images ({s.num_empty_images} without objects), {s.num_annotations} "
            f"boxes ({per_class})\n  --annotations {s.annotations_uri} --images {s.images_uri}"
        )
    return 0

"""``dhrcnn prepare --annotations URI --images URI --out URI``: COCO -> sharded Parquet + manifest, on Ray Data.

One split per run, e.g. for the layout ``dhrcnn synth`` writes::

    dhrcnn prepare --annotations s3://b/shapes/annotations/instances_train.json \\
                   --images s3://b/shapes/images/train --out s3://b/prepared/train
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (local path or s3://)")
    parser.add_argument("--images", required=True, help="image root that the JSON's file names are relative to")
    parser.add_argument("--out", required=True, help="output dataset directory (local path or s3://)")
    parser.add_argument("--drop-empty", action="store_true", help="drop images without usable annotations")
    parser.add_argument("--skip-missing", action="store_true", help="skip (and count) missing images")
    parser.add_argument(
        "--skip-corrupt", action="store_true", help="skip (and count) undecodable or wrongly-sized images"
    )
    parser.add_argument("--rows-per-shard", type=int, default=256, help="images per Parquet file (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset prepared from another source")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    parser.add_argument(
        "--ray-address", default="local", help="Ray cluster to use (default: start a local one; 'auto' to join)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipeline.coco import DatasetError
    from pipeline.prepare import PrepareOptions, prepare_coco
    from pipeline.storage import StorageConfig, StorageError

    options = PrepareOptions(
        drop_empty=args.drop_empty,
        skip_missing=args.skip_missing,
        skip_corrupt=args.skip_corrupt,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
    )
    config = StorageConfig(endpoint_url=args.endpoint_url)
    if not ray.is_initialized():
        local = args.ray_address == "local"
        ray.init(address=args.ray_address, num_cpus=args.num_cpus if local else None, include_dashboard=False)
    try:
        result = prepare_coco(args.annotations, args.images, args.out, options, config)
    except (DatasetError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = result.manifest
    if result.up_to_date:
        print(f"{args.out} is up to date (source fingerprint {m.fingerprint[:12]}); nothing to do.")
    c = m.counts
    drops = ", ".join(f"{k} {v}" for k, v in m.drop_counts.items() if v) or "none"
    print(
        f"{args.out}: {c['images']} images, {c['annotations']} boxes ({c['crowd']} crowd), {len(m.shards)} shards, "
        f"{m.categories.num_classes} classes\n  from {c['source_images']} images / {c['source_annotations']} "
        f"annotations; dropped: {drops}; clipped boxes: {c['clipped_boxes']}; skipped images: "
        f"{c['missing_images']} missing, {c['corrupt_images']} corrupt"
    )
    for p in m.skipped_images[:5]:
        print(f"  skipped image id {p['image_id']} ({p['file_name']}): {p['reason']}: {p['detail']}")
    return 0

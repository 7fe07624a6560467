"""``dhrcnn predict``: batch inference with Ray Data over a folder or an ``s3://`` prefix of images.

    dhrcnn predict --model models:/double-head-frcnn@champion --images s3://bucket/photos --out s3://bucket/preds
    dhrcnn predict --model models:/NAME@ALIAS --images DIR --annotations GT.json --out DIR --render 8

writes ``detections.json`` (COCO results), ``detections.parquet`` (one row per image), ``images.json`` (the
ids, without ``--annotations``), ``rendered/*.jpg`` (``--render N``) and ``skipped.json`` (files that are not
images, or not decodable: skipped with a warning). See :mod:`jobs.evaluate.batch_predict`. Ray: ``RAY_ADDRESS`` joins a
cluster, else a local Ray is started.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, …")
    parser.add_argument("--images", required=True, metavar="URI", help="folder or s3:// prefix (listed recursively)")
    parser.add_argument("--out", required=True, metavar="URI", help="output folder or s3:// prefix")
    parser.add_argument(
        "--annotations", metavar="GT.json", default=None, help="take image ids from this COCO file (by file_name)"
    )
    parser.add_argument("--render", type=int, default=0, metavar="N", help="draw the boxes of N images (default 0)")
    parser.add_argument("--render-thresh", type=float, default=0.3, help="draw boxes scoring at least this (0.3)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call (default 4)")
    parser.add_argument("--score-thresh", type=float, default=0.0, help="drop detections below this (default 0)")
    parser.add_argument("--concurrency", type=int, default=1, help="actors, each holding the model (default 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs per actor (default 1)")
    parser.add_argument(
        "--gpus-per-actor", type=float, default=None, help="Ray GPUs per actor (default: 1 if the cluster has GPUs)"
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    from jobs.evaluate.batch_predict import PredictConfig, PredictError, run_predict
    from jobs.mlflow.uri import TrackingError
    from pipeline.storage import StorageConfig, StorageError

    try:
        cfg = PredictConfig(
            model_uri=args.model,
            images=args.images,
            out=args.out,
            annotations=args.annotations,
            tracking_uri=args.tracking_uri,
            batch_size=args.batch_size,
            score_thresh=args.score_thresh,
            concurrency=args.concurrency,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            render=args.render,
            render_score_thresh=args.render_thresh,
            storage=StorageConfig(endpoint_url=args.endpoint_url),
        )
        result = run_predict(cfg)
    except (PredictError, TrackingError, StorageError) as err:  # RegistryError is a TrackingError
        print(f"error: {err}", file=sys.stderr)
        return 1
    skipped = f", {len(result.skipped)} files skipped (see skipped.json)" if result.skipped else ""
    print(f"{args.model}: {result.num_detections} detections on {result.num_images} images{skipped}")
    for uri in result.written:
        print(f"wrote {uri}")
    return 0

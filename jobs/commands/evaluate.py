"""``dhrcnn evaluate``: COCO box AP, exactly as pycocotools computes it.

Scoring a COCO results file against its annotation file (local paths or ``s3://`` URIs)::

    dhrcnn evaluate --gt instances_val.json --detections detections.json --output metrics.json

prints the 12 standard numbers (as ``COCOeval.summarize`` does) and a per-class AP table; ``--output``
writes ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
"per_class_AP": {name: AP}}`` (fractions; ``-1`` where pycocotools reports -1: nothing to score).

The two modes of the command, one argument of each pair:

============================  =======================================================================
what is scored                against what
============================  =======================================================================
``--detections DETS.json``    ``--gt GT.json`` (the COCO instances file the detections refer to)
``--model URI``               ``--data PARQUET`` (from ``dhrcnn prepare``) or ``--annotations`` +
                              ``--images`` (a raw COCO dataset)
============================  =======================================================================

In model mode the images go through the same evaluation stream (Ray Data, the model's own evaluation
resize) and COCOeval as during training, so the numbers equal the training job's evaluation of that model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scored = parser.add_argument_group("what to score (one of)").add_mutually_exclusive_group(required=True)
    scored.add_argument(
        "--detections",
        metavar="DETS.json",
        help="COCO results file: a JSON list of {image_id, category_id, bbox [x,y,w,h], score} (path or s3://)",
    )
    scored.add_argument(
        "--model",
        metavar="URI",
        help="a model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a model file (import-mmdet)",
    )

    truth = parser.add_argument_group("ground truth (one of)").add_mutually_exclusive_group(required=True)
    truth.add_argument("--gt", metavar="GT.json", help="COCO instances file the detections refer to (path or s3://)")
    truth.add_argument("--data", metavar="URI", help="with --model: a dataset prepared by `dhrcnn prepare`")
    truth.add_argument("--annotations", metavar="URI", help="with --model and --images: a raw COCO instances file")
    parser.add_argument("--images", metavar="URI", default=None, help="with --annotations: the image folder/prefix")
    parser.add_argument("--save-detections", metavar="FILE", default=None, help="model mode: write COCO results")
    parser.add_argument("--max-images", type=int, default=None, help="model mode: score only the first N images")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ URIs")

    parser.add_argument("--output", metavar="FILE", default=None, help="write the metrics as JSON (path or s3://)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    if args.detections is not None:
        if args.gt is None:
            return _fail("--detections needs --gt, the COCO instances file its image and category ids refer to")
        return _score_results_file(args)
    if args.model is not None:
        if args.gt is not None:
            return _fail("--model is scored on a dataset: give --data URI (or --annotations URI --images URI)")
        return _score_model(args)
    return _fail("nothing to score: give --detections DETS.json with --gt GT.json")


def _score_model(args: argparse.Namespace) -> int:
    from jobs.config import DatasetSpec
    from jobs.denormals import flush_denormals
    from jobs.evaluate.model_eval import evaluate_model, load_for_eval
    from jobs.evaluate.plots import per_class_table
    from jobs.ray_env import ensure_ray
    from pipeline.storage import StorageConfig, write_bytes

    if args.annotations is not None and args.images is None:
        return _fail("--annotations needs --images, the folder or prefix its file names are relative to")
    flush_denormals()  # the detector runs in this process (jobs/denormals.py)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    spec = (
        DatasetSpec(parquet=args.data) if args.data else DatasetSpec(annotations=args.annotations, images=args.images)
    )
    detector = load_for_eval(args.model, tracking_uri=args.tracking_uri)
    ensure_ray()
    metrics, detections = evaluate_model(detector, spec, storage, max_images=args.max_images)
    print(f"{args.model}: {metrics.num_detections} detections on {metrics.num_images} images")
    print(metrics.summary())
    print()
    print(per_class_table(metrics), end="")
    if args.save_detections:
        write_bytes(args.save_detections, json.dumps(detections).encode(), storage)
        print(f"wrote {args.save_detections}")
    if args.output:
        write_bytes(args.output, json.dumps(metrics.to_json(), indent=2).encode() + b"\n", storage)
        print(f"wrote {args.output}")
    return 0


def _score_results_file(args: argparse.Namespace) -> int:
    from jobs.evaluate.coco_eval import EvaluationInputError, evaluate_coco
    from jobs.evaluate.plots import per_class_table
    from pipeline.storage import StorageConfig, StorageError, write_bytes

    storage = StorageConfig(endpoint_url=args.endpoint_url)
    try:
        gt = _read_json(args.gt, "a COCO instances file", storage)
        detections = _read_json(args.detections, "a COCO results file (a JSON list)", storage)
    except (StorageError, _BadJson) as exc:
        return _fail(str(exc))
    try:
        metrics = evaluate_coco(gt, detections)
    except EvaluationInputError as exc:
        return _fail(f"scoring {args.detections} against {args.gt}: {exc}")

    print(f"{args.detections}: {metrics.num_detections} detections on {metrics.num_images} images of {args.gt}")
    print(metrics.summary())
    print()
    print(per_class_table(metrics), end="")
    if args.output:
        data = json.dumps(metrics.to_json(), indent=2).encode() + b"\n"
        try:
            write_bytes(args.output, data, storage)
        except StorageError as exc:
            return _fail(str(exc))
        print(f"wrote {args.output}")
    return 0


class _BadJson(ValueError):
    pass


def _read_json(uri: str, what: str, storage: Any) -> Any:
    from pipeline.storage import read_bytes

    raw = read_bytes(uri, storage)
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise _BadJson(f"{uri}: not a text file; expected {what}") from None
    except json.JSONDecodeError as exc:
        raise _BadJson(
            f"{uri}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); expected {what}"
        ) from None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1

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
(model mode, not here yet:    (model mode: the prepared dataset, ``--data``)
``--checkpoint``/``--model``)
============================  =======================================================================

Model mode is an extension point: add its flags to the two mutually exclusive groups in
:func:`add_arguments` and dispatch to it in :func:`run`.
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
    # Model mode (extension point): --checkpoint FILE / --model models:/NAME@ALIAS join this group.

    truth = parser.add_argument_group("ground truth (one of)").add_mutually_exclusive_group(required=True)
    truth.add_argument("--gt", metavar="GT.json", help="COCO instances file the detections refer to (path or s3://)")
    # Model mode (extension point): --data PREPARED_DATASET joins this group.

    parser.add_argument("--output", metavar="FILE", default=None, help="write the metrics as JSON (path or s3://)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    if args.detections is not None:
        if args.gt is None:
            return _fail("--detections needs --gt, the COCO instances file its image and category ids refer to")
        return _score_results_file(args)
    return _fail("nothing to score: give --detections DETS.json with --gt GT.json")


def _score_results_file(args: argparse.Namespace) -> int:
    from jobs.coco_eval import EvaluationInputError, evaluate_coco
    from jobs.eval_plots import per_class_table
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

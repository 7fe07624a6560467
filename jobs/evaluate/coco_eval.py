"""COCO box evaluation: pycocotools' ``COCOeval`` run in memory, its numbers returned as :class:`CocoMetrics`.

The numbers are exactly pycocotools' (the ground truth and results go through ``COCO`` / ``loadRes`` /
``COCOeval`` unchanged, with the default bbox parameters: IoU .50:.05:.95, 101 recall points, maxDets
1/10/100, areas all/small/medium/large); only pycocotools' prints are silenced. Conventions kept from it:

* A number that is undefined (no ground truth in that area range, or a class without ground truth among the
  evaluated images) is ``-1``, not NaN, in :attr:`CocoMetrics.stats` and :attr:`CocoMetrics.per_class_ap`;
  every other value is a fraction in ``[0, 1]``.
* Crowd ground truth (``iscrowd=1``) is matched to detections by pycocotools' crowd IoU and ignored: a
  detection inside a crowd region is neither a true nor a false positive.

Two deliberate differences, both on inputs pycocotools mishandles: an empty results list scores 0 (where
ground truth exists) instead of crashing inside ``loadRes([])``, and bad inputs raise
:class:`EvaluationInputError` naming the offending entry (an unknown image id, an unknown category id,
which pycocotools would silently drop, a malformed box, a duplicated annotation id, which it would silently
mis-score) instead of an ``AssertionError`` or a wrong number.

Detections in COCO results format are made from the model's outputs with :func:`detections_to_coco`, after
the boxes have been mapped back to original-image pixels (``pipeline.collate.unscale_boxes``).
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_PYCOCOTOOLS = threading.Lock()  # one evaluation at a time in a process: see _pycocotools_silenced

# pycocotools' ``COCOeval.stats``, in its order.
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# One line per number, as ``COCOeval.summarize`` prints them: (AP or AR, IoU, area, maxDets).
_SUMMARY_ROWS: tuple[tuple[str, str, str, int], ...] = (
    ("AP", "0.50:0.95", "all", 100),
    ("AP", "0.50", "all", 100),
    ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100),
    ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1),
    ("AR", "0.50:0.95", "all", 10),
    ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100),
    ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
)


class EvaluationInputError(ValueError):
    """The ground truth or the detections are malformed; the message names the entry and the field."""


@dataclass(frozen=True, eq=False)
class CocoMetrics:
    """The outcome of one COCO box evaluation.

    Attributes:
        stats: the 12 numbers of ``COCOeval.stats`` under :data:`STAT_NAMES` (fractions, ``-1`` = undefined).
        per_class_ap: class name -> AP@[.50:.95] (area all, maxDets 100), computed as pycocotools computes
            ``stats[0]`` but for one class; ``-1`` for a class without ground truth among the evaluated
            images (reported, not omitted). Names in increasing category id order.
        precision: float64 ``[T=10, R=101, K, A=4, M=3]``, pycocotools' ``eval["precision"]``: precision at
            IoU threshold t, recall threshold r, class k (order of :attr:`category_ids`), area range a (all,
            small, medium, large), maxDets m (1, 10, 100); ``-1`` where undefined. Read-only.
        recall: float64 ``[T, K, A, M]``, pycocotools' ``eval["recall"]`` (the maximum recall). Read-only.
        iou_thresholds: float64 ``[T]`` (0.50 ... 0.95). rec_thresholds: float64 ``[R]`` (0.00 ... 1.00).
        category_ids: the K ground-truth category ids, increasing (axis 2 of ``precision``).
        class_names: the K names, aligned with ``category_ids``.
        num_gt: K counts of non-crowd ground-truth boxes among the evaluated images.
        num_images: images evaluated. num_detections: detections given (on any image).
    """

    stats: dict[str, float]
    per_class_ap: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: np.ndarray
    rec_thresholds: np.ndarray
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    num_gt: tuple[int, ...]
    num_images: int
    num_detections: int

    def to_json(self) -> dict[str, Any]:
        """``{"AP": ..., ..., "ARl": ..., "per_class_AP": {name: AP}}``, JSON-serialisable (no NaN)."""
        return {**{k: float(v) for k, v in self.stats.items()}, "per_class_AP": dict(self.per_class_ap)}

    def class_ap(self, iou: float | None = None, area: int = 0, max_dets: int = 2) -> np.ndarray:
        """Per-class AP, float64 ``[K]``, the way pycocotools averages: over recall points (and IoU
        thresholds when ``iou`` is None), ignoring ``-1``; ``-1`` for a class with nothing defined.

        Args:
            iou: one IoU threshold (0.5, 0.75, ...), or None for the mean over .50:.95.
            area: index into (all, small, medium, large). max_dets: index into (1, 10, 100).
        """
        return _class_ap(self.precision, self.iou_thresholds, iou, area, max_dets)

    def summary(self) -> str:
        """The 12 numbers as ``COCOeval.summarize`` prints them, one per line."""
        return summary_table(self.stats)


def summary_table(stats: Mapping[str, float]) -> str:
    """The 12 numbers of ``stats`` (keys :data:`STAT_NAMES`) as ``COCOeval.summarize`` prints them, one per line."""
    lines = []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _SUMMARY_ROWS, strict=True):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(
            f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {stats[name]:0.3f}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _pycocotools_silenced() -> Iterator[None]:
    """pycocotools reports every step with ``print``. ``redirect_stdout`` catches that in a plain process, but
    in a Ray Train worker ``builtins.print`` is Ray Train's, which logs each call to the root logger whatever
    ``sys.stdout`` is; a module-level ``print`` in pycocotools' two modules shadows the builtin for the block."""
    import pycocotools.coco
    import pycocotools.cocoeval

    modules = (pycocotools.coco, pycocotools.cocoeval)
    with _PYCOCOTOOLS, contextlib.redirect_stdout(io.StringIO()):
        for module in modules:
            module.print = _discard  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for module in modules:
                del module.print  # type: ignore[attr-defined]


def _discard(*args: Any, **kwargs: Any) -> None:
    pass


def evaluate_coco(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
) -> CocoMetrics:
    """Score COCO-format box detections against COCO ground truth with pycocotools.

    Args:
        gt: a COCO instances dict (``images``, ``annotations`` with ``id``, ``image_id``, ``category_id``,
            ``bbox`` xywh, ``area``, ``iscrowd``; ``categories``). Not modified.
        detections: COCO results, one dict per box: ``image_id``, ``category_id`` (dataset ids, not
            contiguous labels), ``bbox`` ``[x, y, w, h]`` in original-image pixels, ``score``. Not modified.
        image_ids: evaluate only these images (every one must be in ``gt``); default all of ``gt``'s.
            Detections on other images are ignored, as pycocotools does.
        class_names: names for :attr:`CocoMetrics.per_class_ap`: category id -> name, or K names in
            increasing category id order (= label 1..K order of ``pipeline.categories.CategoryMap``);
            default the ``name`` of each GT category.

    Raises:
        EvaluationInputError: malformed ground truth or detections (the message names the entry).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_data = _checked_gt(gt)
    cat_ids = sorted(c["id"] for c in gt_data["categories"])
    img_ids = {im["id"] for im in gt_data["images"]}
    results = _checked_detections(detections, img_ids, set(cat_ids))
    eval_ids = _checked_image_ids(image_ids, img_ids)
    names = _class_names(class_names, gt_data["categories"], cat_ids)

    with _pycocotools_silenced():
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # what loadRes would build, had it not indexed results[0]
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt_data["images"]),
                "categories": [dict(c) for c in gt_data["categories"]],
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if eval_ids is not None:
            evaluator.params.imgIds = eval_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    evaluated = set(evaluator.params.imgIds)
    counts = dict.fromkeys(cat_ids, 0)
    for a in gt_data["annotations"]:
        if a["image_id"] in evaluated and not a["iscrowd"]:
            counts[a["category_id"]] += 1
    precision = np.array(evaluator.eval["precision"], dtype=np.float64)
    recall = np.array(evaluator.eval["recall"], dtype=np.float64)
    for array in (precision, recall):
        array.setflags(write=False)
    iou_thresholds = np.array(evaluator.params.iouThrs, dtype=np.float64)
    per_class = _class_ap(precision, iou_thresholds)
    return CocoMetrics(
        stats={name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)},
        per_class_ap={n: float(v) for n, v in zip(names, per_class, strict=True)},
        precision=precision,
        recall=recall,
        iou_thresholds=iou_thresholds,
        rec_thresholds=np.array(evaluator.params.recThrs, dtype=np.float64),
        category_ids=tuple(cat_ids),
        class_names=names,
        num_gt=tuple(counts[c] for c in cat_ids),
        num_images=len(evaluated),
        num_detections=len(results),
    )


def detections_to_coco(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    label_to_category_id: Mapping[int, int] | Callable[[int], int],
) -> list[dict[str, Any]]:
    """One image's detections as COCO results.

    Args:
        image_id: the COCO image id.
        boxes_xyxy: float ``[D, 4]`` xyxy in *original*-image pixels (torch tensor, numpy array or nested
            lists); map the model's resized-image boxes back first with ``pipeline.collate.unscale_boxes``.
        scores: float ``[D]``. labels: int ``[D]``, contiguous labels 1..K (0 = background never appears).
        label_to_category_id: label -> dataset category id, a mapping or a callable such as
            ``CategoryMap.category_id_of``.

    Returns:
        D dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of Python ints and floats;
        ``w = x2 - x1``, ``h = y2 - y1``, no rounding.
    """
    boxes = _to_numpy(boxes_xyxy).astype(np.float64).reshape(-1, 4)
    score_arr = _to_numpy(scores).astype(np.float64).reshape(-1)
    label_arr = _to_numpy(labels).reshape(-1)
    if not len(boxes) == len(score_arr) == len(label_arr):
        raise ValueError(
            f"detections_to_coco: image {image_id}: {len(boxes)} boxes, {len(score_arr)} scores and "
            f"{len(label_arr)} labels; expected one of each per detection"
        )
    lookup = label_to_category_id.__getitem__ if isinstance(label_to_category_id, Mapping) else label_to_category_id
    category_of: dict[int, int] = {}
    out = []
    for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), score_arr.tolist(), label_arr.tolist(), strict=True):
        label = int(label)
        if label not in category_of:
            try:
                category_of[label] = int(lookup(label))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"detections_to_coco: image {image_id}: label {label} has no category id ({exc}); labels must be "
                    "the contiguous 1..K of the dataset's category map"
                ) from None
        out.append(
            {
                "image_id": int(image_id),
                "category_id": category_of[label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
        )
    return out


def _class_ap(
    precision: np.ndarray, iou_thresholds: np.ndarray, iou: float | None = None, area: int = 0, max_dets: int = 2
) -> np.ndarray:
    """Per-class means of ``precision`` ``[T, R, K, A, M]`` over its defined (> -1) entries, float64 ``[K]``."""
    p = precision
    if iou is not None:
        p = p[np.flatnonzero(np.isclose(iou_thresholds, iou))]
        if p.shape[0] != 1:
            raise ValueError(f"IoU threshold {iou} is not one of {iou_thresholds.tolist()}")
    p = p[:, :, :, area, max_dets]  # [T, R, K]
    out = np.full(p.shape[2], -1.0)
    for k in range(p.shape[2]):
        valid = p[:, :, k][p[:, :, k] > -1]
        if valid.size:
            out[k] = float(np.mean(valid))
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _checked_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``gt`` whose annotations are fresh dicts (COCOeval writes ``ignore`` into them)."""
    if not isinstance(gt, Mapping):
        raise EvaluationInputError(f"ground truth: expected a COCO instances object, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationInputError(
                f"ground truth: {key!r} is missing or not a list; is this a COCO instances file?"
            )
    images = gt["images"]
    for i, im in enumerate(images):
        if not isinstance(im, Mapping) or not _is_int(im.get("id")):
            raise EvaluationInputError(f"ground truth: images[{i}] has no integer 'id'")
    for i, c in enumerate(gt["categories"]):
        if not isinstance(c, Mapping) or not _is_int(c.get("id")):
            raise EvaluationInputError(f"ground truth: categories[{i}] has no integer 'id'")
    seen: set[Any] = set()
    annotations = []
    for i, a in enumerate(gt["annotations"]):
        where = f"ground truth: annotations[{i}] (id {a.get('id') if isinstance(a, Mapping) else '?'})"
        if not isinstance(a, Mapping):
            raise EvaluationInputError(f"{where}: expected an object")
        for key in ("id", "image_id", "category_id", "bbox", "area", "iscrowd"):
            if key not in a:
                raise EvaluationInputError(f"{where}: missing field {key!r} (pycocotools needs it)")
        if a["id"] in seen:
            raise EvaluationInputError(f"{where}: annotation id {a['id']} is used twice; ids must be unique")
        seen.add(a["id"])
        _check_box(a["bbox"], where)
        annotations.append(dict(a))
    return {**gt, "images": list(images), "annotations": annotations, "categories": list(gt["categories"])}


def _checked_detections(
    detections: Sequence[Mapping[str, Any]], img_ids: set[int], cat_ids: set[int]
) -> list[dict[str, Any]]:
    """Fresh copies of the detections (loadRes writes ``id``, ``area``... into them), checked."""
    if isinstance(detections, Mapping) or not isinstance(detections, Sequence):
        raise EvaluationInputError(
            f"detections: expected a list of COCO results ({{image_id, category_id, bbox, score}}), "
            f"got {type(detections).__name__}"
        )
    out = []
    for i, d in enumerate(detections):
        where = f"detections[{i}]"
        if not isinstance(d, Mapping):
            raise EvaluationInputError(f"{where}: expected an object, got {type(d).__name__}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise EvaluationInputError(f"{where}: missing field {key!r}")
        if d["image_id"] not in img_ids:
            raise EvaluationInputError(
                f"{where}: image_id {d['image_id']!r} is not an image of the ground truth; detections must use "
                "the image ids of the same annotation file (same split) they are scored against"
            )
        if d["category_id"] not in cat_ids:
            raise EvaluationInputError(
                f"{where}: category_id {d['category_id']!r} is not a ground-truth category (ids {sorted(cat_ids)}); "
                "map the model's contiguous labels 1..K back to dataset category ids "
                "(pipeline.categories.CategoryMap.category_id_of) before writing results"
            )
        _check_box(d["bbox"], where)
        score = d["score"]
        if not _is_number(score):
            raise EvaluationInputError(f"{where}: score must be a finite number, got {score!r}")
        out.append(dict(d))
    return out


def _check_box(bbox: Any, where: str) -> None:
    ok = isinstance(bbox, list | tuple) and len(bbox) == 4
    ok = ok and all(_is_number(v) for v in bbox)
    if not ok or bbox[2] < 0 or bbox[3] < 0:
        raise EvaluationInputError(
            f"{where}: bbox must be [x, y, w, h] with finite numbers and w, h >= 0, got {bbox!r}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _checked_image_ids(image_ids: Iterable[int] | None, img_ids: set[int]) -> list[int] | None:
    if image_ids is None:
        return None
    ids = sorted({int(i) for i in image_ids})
    unknown = [i for i in ids if i not in img_ids]
    if unknown:
        raise EvaluationInputError(f"image_ids: {unknown[:10]} are not images of the ground truth")
    if not ids:
        raise EvaluationInputError("image_ids: empty; give at least one image id (or None for all)")
    return ids


def _class_names(
    given: Mapping[int, str] | Sequence[str] | None, categories: list[Mapping[str, Any]], cat_ids: list[int]
) -> tuple[str, ...]:
    if given is None:
        by_id = {c["id"]: str(c.get("name", c["id"])) for c in categories}
        names = [by_id[c] for c in cat_ids]
    elif isinstance(given, Mapping):
        names = [str(given.get(c, c)) for c in cat_ids]
    else:
        if len(given) != len(cat_ids):
            raise EvaluationInputError(f"class_names: {len(given)} names for {len(cat_ids)} ground-truth categories")
        names = [str(n) for n in given]
    # Keys of per_class_ap must be unique: disambiguate repeated names with the category id.
    repeated = {n for n in names if names.count(n) > 1}
    return tuple(f"{n} (id {c})" if n in repeated else n for n, c in zip(names, cat_ids, strict=True))

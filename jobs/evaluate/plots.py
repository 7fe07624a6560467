"""Pictures and tables of an evaluation: precision-recall curves, a per-class AP table, a detections grid, and
the one box renderer (:func:`annotate`) that the grid and ``dhrcnn predict --render`` share.

Plots use matplotlib's object API with the Agg canvas (no ``pyplot``, so no process-global figure state and
no display needed); the grid is drawn with PIL. Every writer takes a local path or an ``s3://`` URI
(:mod:`pipeline.storage`) and returns it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jobs.evaluate.coco_eval import CocoMetrics
from pipeline.storage import StorageConfig, write_bytes

GT_COLOR = (0, 200, 0)  # green
PRED_COLOR = (255, 40, 200)  # magenta
PR_FIGSIZE = (12.0, 5.0)  # inches, at PR_DPI: 1200 x 500 pixels
PR_DPI = 100
MAX_CLASSES_PLOTTED = 12  # per-class curves only when there are at most this many classes

# Boxes drawn per image and per kind, at most (highest scores first): keeps a crowded image readable.
_MAX_BOXES = 100
_GUTTER = 4  # pixels of background kept around each image in its cell


def plot_pr_curves(metrics: CocoMetrics, path: str, *, storage: StorageConfig | None = None) -> str:
    """Precision-recall curves, saved as a ``PR_FIGSIZE x PR_DPI`` PNG (1200 x 500 pixels).

    Left: precision at each of pycocotools' 101 recall thresholds (area all, maxDets 100) averaged over the
    classes that have ground truth, at IoU 0.50, 0.75 and averaged over .50:.95. Right (when there are at
    most :data:`MAX_CLASSES_PLOTTED` classes): one curve per class at IoU .50:.95, with its AP in the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recall = metrics.rec_thresholds
    fig = Figure(figsize=PR_FIGSIZE, dpi=PR_DPI)
    FigureCanvasAgg(fig)
    ax_mean, ax_cls = fig.subplots(1, 2)
    p = metrics.precision[:, :, :, 0, -1]  # [T, R, K]: area all, maxDets 100
    curves = [
        (f"IoU 0.50 (AP50 {_fmt(metrics.stats['AP50'])})", p[_iou_index(metrics, 0.5)][None]),
        (f"IoU 0.75 (AP75 {_fmt(metrics.stats['AP75'])})", p[_iou_index(metrics, 0.75)][None]),
        (f"IoU 0.50:0.95 (AP {_fmt(metrics.stats['AP'])})", p),
    ]
    for label, prec in curves:  # prec [t, R, K]
        ax_mean.plot(recall, _mean_defined(prec.transpose(1, 0, 2).reshape(len(recall), -1)), label=label)
    _style(ax_mean, f"mean over classes ({metrics.num_images} images, {metrics.num_detections} detections)")

    if len(metrics.class_names) <= MAX_CLASSES_PLOTTED:
        for k, name in enumerate(metrics.class_names):
            curve = _mean_defined(p[:, :, k].T)  # [R]
            if np.all(np.isnan(curve)):
                continue  # no ground truth for this class
            ax_cls.plot(recall, curve, label=f"{name} ({_fmt(metrics.per_class_ap[name])})")
        _style(ax_cls, "per class, IoU 0.50:0.95")
    else:
        ax_cls.axis("off")
        ax_cls.text(0.5, 0.5, f"{len(metrics.class_names)} classes: see the per-class AP table", ha="center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PR_DPI)
    write_bytes(path, buffer.getvalue(), storage)
    return path


def per_class_table(metrics: CocoMetrics, fmt: str = "markdown") -> str:
    """Per-class AP as a markdown (``fmt="markdown"``) or CSV (``fmt="csv"``) table.

    Columns: class, category_id, gt (non-crowd instances), AP (.50:.95), AP50, AP75; ``-1`` where a class
    has no ground truth among the evaluated images. Rows in increasing category id order.
    """
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"per_class_table: fmt must be 'markdown' or 'csv', got {fmt!r}")
    columns = (metrics.class_ap(), metrics.class_ap(iou=0.5), metrics.class_ap(iou=0.75))
    header = ["class", "category_id", "gt", "AP", "AP50", "AP75"]
    rows = [
        [name, str(cid), str(n), *(f"{float(c[k]):.4f}" for c in columns)]
        for k, (name, cid, n) in enumerate(zip(metrics.class_names, metrics.category_ids, metrics.num_gt, strict=True))
    ]
    if fmt == "csv":
        return "\n".join(",".join(_csv_cell(v) for v in row) for row in [header, *rows]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---:", "---:", "---:", "---:", "---:"]) + "|"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def draw_detections_grid(
    images: Sequence[np.ndarray],
    gts: Sequence[tuple[Any, Any]],
    preds: Sequence[tuple[Any, Any, Any]],
    class_names: Sequence[str],
    path: str,
    score_thresh: float = 0.3,
    max_images: int = 16,
    *,
    cell_size: int = 400,
    storage: StorageConfig | None = None,
) -> str:
    """A PNG grid of images with ground truth (green) and predictions (magenta, with scores) drawn.

    Args:
        images: uint8 ``[H, W, 3]`` (or ``[H, W]``) arrays in original-image pixels.
        gts: per image ``(boxes, labels)``: float ``[N, 4]`` xyxy original pixels, int ``[N]`` labels 1..K.
        preds: per image ``(boxes, scores, labels)``: ``[D, 4]`` xyxy original pixels, ``[D]``, ``[D]``
            labels 1..K. Predictions scoring below ``score_thresh`` are not drawn.
        class_names: ``class_names[k - 1]`` is the name of label k.
        path: output PNG, local or ``s3://``.
        max_images: the first ``max_images`` images are drawn.
        cell_size: each image is scaled to fit a ``cell_size`` square, less a 4-pixel gutter (aspect kept).

    The PNG is ``cols * cell_size`` wide and ``LEGEND + rows * cell_size`` high, with
    ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)``, ``n = min(len(images), max_images)``, and the
    legend band ``grid_legend_height(cell_size)`` pixels.
    """
    n = min(len(images), max_images)
    if n == 0:
        raise ValueError("draw_detections_grid: no images to draw")
    if not len(images) == len(gts) == len(preds):
        raise ValueError(f"draw_detections_grid: {len(images)} images, {len(gts)} gts, {len(preds)} preds")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    legend_h = grid_legend_height(cell_size)
    canvas = Image.new("RGB", (cols * cell_size, legend_h + rows * cell_size), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (8, legend_h // 2),
        "ground truth",
        fill=GT_COLOR,
        font=_font(legend_h // 2),
        anchor="lm",
    )
    draw.text(
        (8 + cols * cell_size // 2, legend_h // 2),
        f"predictions (score >= {score_thresh:g})",
        fill=PRED_COLOR,
        font=_font(legend_h // 2),
        anchor="lm",
    )
    for i in range(n):
        tile = annotate(images[i], preds[i], class_names, score_thresh, gt=gts[i], fit=cell_size - 2 * _GUTTER)
        x0, y0 = (i % cols) * cell_size, legend_h + (i // cols) * cell_size
        canvas.paste(tile, (x0 + (cell_size - tile.width) // 2, y0 + (cell_size - tile.height) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue(), storage)
    return path


def grid_legend_height(cell_size: int) -> int:
    """Height in pixels of the legend band at the top of :func:`draw_detections_grid`'s picture."""
    return max(24, cell_size // 12)


def annotate(
    image: np.ndarray,
    pred: tuple[Any, Any, Any],
    class_names: Sequence[str] | Mapping[int, str],
    score_thresh: float = 0.3,
    *,
    gt: tuple[Any, Any] | None = None,
    fit: int | None = None,
) -> Image.Image:
    """``image`` with its predictions (magenta, name and score above the box) and optionally its ground truth
    (green, name inside the box's bottom edge) drawn: at most 100 of each, highest scores first.

    Args:
        image: uint8 ``[H, W, 3]`` (or ``[H, W]``); the boxes are in its pixels.
        pred: ``(boxes [D, 4] xyxy, scores [D], labels [D] in 1..K)``; those scoring below ``score_thresh``
            are not drawn. gt: ``(boxes [N, 4], labels [N])``.
        class_names: ``class_names[k - 1]`` (a sequence) or ``class_names[k]`` (a mapping) names label k.
        fit: scale the picture (aspect kept) so that its longer side is ``fit`` pixels; ``None``: as is.

    Line width and caption size follow the picture's longer side ``S``: ``max(1, S // 200)`` and
    ``max(11, S // 28)`` pixels.
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"annotate: expected a uint8 [H, W, 3] image, got {pixels.dtype} {pixels.shape}")
    tile = Image.fromarray(pixels).convert("RGB")
    scale = 1.0 if fit is None else fit / max(tile.width, tile.height)
    if fit is not None:
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(tile)
    side = max(tile.width, tile.height)
    width, font = max(1, side // 200), _font(max(11, side // 28))
    if gt is not None:
        gt_boxes, gt_labels = _boxes(gt[0]), _flat(gt[1])
        for box, label in list(zip(gt_boxes, gt_labels, strict=True))[:_MAX_BOXES]:
            _box_with_text(
                draw, box * scale, _name(class_names, label), GT_COLOR, width, font, image_width=tile.width, below=True
            )
    boxes, scores, labels = _boxes(pred[0]), _flat(pred[1]).astype(float), _flat(pred[2])
    order = [int(j) for j in np.argsort(-scores, kind="stable") if scores[j] >= score_thresh][:_MAX_BOXES]
    for j in order:
        text = f"{_name(class_names, labels[j])} {scores[j]:.2f}"
        _box_with_text(draw, boxes[j] * scale, text, PRED_COLOR, width, font, image_width=tile.width, below=False)
    return tile


def _box_with_text(
    draw: ImageDraw.ImageDraw,
    box: np.ndarray,
    text: str,
    color: tuple[int, int, int],
    width: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    *,
    image_width: int,
    below: bool,
) -> None:
    """A box outline and a filled caption: predictions' above the box's top edge, ground truth's inside it
    at the bottom edge, so that a matching pair does not hide each other's caption."""
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=width)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    ty = max(y2 - th, 0) if below else max(y1 - th, 0)
    tx = min(max(x1, 0), max(image_width - tw, 0))
    draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
    draw.text((tx + 2 - left, ty + 2 - top), text, fill=(0, 0, 0), font=font)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _boxes(value: Any) -> np.ndarray:
    return _numpy(value).astype(np.float64).reshape(-1, 4)


def _flat(value: Any) -> np.ndarray:
    return _numpy(value).reshape(-1)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _name(class_names: Sequence[str] | Mapping[int, str], label: Any) -> str:
    k = int(label)
    if isinstance(class_names, Mapping):
        return class_names.get(k, str(k))
    return class_names[k - 1] if 1 <= k <= len(class_names) else str(k)


def _iou_index(metrics: CocoMetrics, iou: float) -> int:
    return int(np.flatnonzero(np.isclose(metrics.iou_thresholds, iou))[0])


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Row means of ``[R, C]`` over entries > -1; NaN where a row has none (matplotlib leaves a gap)."""
    valid = values > -1
    total = np.where(valid, values, 0.0).sum(axis=1)
    count = valid.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _style(ax: Any, title: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize="small")


def _fmt(value: float) -> str:
    return "n/a" if value < 0 else f"{value:.3f}"


def _csv_cell(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value

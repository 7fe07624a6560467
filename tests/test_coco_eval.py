"""COCO evaluation (``jobs.evaluate.coco_eval``) equals a direct pycocotools run, exactly, on crafted cases; plus the
``dhrcnn evaluate`` command and the evaluation plots."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.cli import main
from jobs.evaluate.coco_eval import STAT_NAMES, CocoMetrics, EvaluationInputError, detections_to_coco, evaluate_coco
from jobs.evaluate.plots import (
    PR_DPI,
    PR_FIGSIZE,
    draw_detections_grid,
    grid_legend_height,
    per_class_table,
    plot_pr_curves,
)
from pipeline.categories import CategoryMap

ROOT = Path(__file__).resolve().parents[1]
Case = tuple[dict[str, Any], list[dict[str, Any]]]


# ---------------------------------------------------------------------------------------------- the oracle


def reference_eval(gt: dict[str, Any], dets: list[dict[str, Any]], image_ids: list[int] | None = None) -> COCOeval:
    """pycocotools as its README uses it: COCO(file) / loadRes / COCOeval (an empty result set built by hand,
    since ``loadRes([])`` raises IndexError)."""
    gt = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same_as_reference(m: CocoMetrics, ref: COCOeval) -> None:
    assert list(m.stats) == list(STAT_NAMES)
    assert [m.stats[k] for k in STAT_NAMES] == [float(v) for v in ref.stats]  # exact, not approx
    assert np.array_equal(m.precision, ref.eval["precision"])
    assert np.array_equal(m.recall, ref.eval["recall"])
    for k, cat_id in enumerate(ref.params.catIds):  # per-class AP: pycocotools' stats[0] formula, one class
        s = ref.eval["precision"][:, :, k, 0, -1]
        expected = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
        assert m.per_class_ap[m.class_names[k]] == expected
        assert m.category_ids[k] == cat_id


# ---------------------------------------------------------------------------------------------- crafted data


def _ann(aid: int, image_id: int, cat: int, box: list[float], crowd: int = 0) -> dict[str, Any]:
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}


def _det(image_id: int, cat: int, box: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def _jitter(rng: np.random.Generator, box: list[float], sigma: float) -> list[float]:
    x, y, w, h = box
    dx, dy, dw, dh = rng.normal(0, sigma, 4) * np.array([w, h, w, h])
    return [float(x + dx), float(y + dy), float(max(w + dw, 1.0)), float(max(h + dh, 1.0))]


def random_case(
    seed: int,
    *,
    cat_ids: tuple[int, ...] = (1, 5, 90),
    images: int = 8,
    crowd: bool = False,
    empty_gt_images: int = 0,
    undetected_images: int = 0,
    dets_per_image: int = 0,
    sizes: tuple[float, float] = (8.0, 200.0),
) -> Case:
    """GT boxes of random sizes on 640x480 images; detections = jittered GT + random false positives."""
    rng = np.random.default_rng(seed)
    gt: dict[str, Any] = {
        "images": [{"id": 100 + i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(images)],
        "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids],
        "annotations": [],
    }
    dets: list[dict[str, Any]] = []
    for i in range(images):
        image_id = 100 + i
        has_gt = i >= empty_gt_images
        detected = i < images - undetected_images
        for _ in range(int(rng.integers(2, 7)) if has_gt else 0):
            w, h = np.exp(rng.uniform(math.log(sizes[0]), math.log(sizes[1]), 2))
            box = [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), float(w), float(h)]
            cat = int(rng.choice(cat_ids))
            gt["annotations"].append(_ann(len(gt["annotations"]) + 1, image_id, cat, box))
            if detected and rng.random() < 0.85:
                dets.append(_det(image_id, cat, _jitter(rng, box, 0.08), float(rng.uniform(0.3, 1))))
        if crowd and has_gt:  # a crowd region with detections inside it (to be ignored, not false positives)
            region = [300.0, 200.0, 200.0, 150.0]
            gt["annotations"].append(_ann(len(gt["annotations"]) + 1, image_id, cat_ids[0], region, crowd=1))
            for _ in range(3 if detected else 0):
                inside = [float(rng.uniform(300, 440)), float(rng.uniform(200, 300)), 40.0, 40.0]
                dets.append(_det(image_id, cat_ids[0], inside, float(rng.uniform(0.2, 0.9))))
        for _ in range((dets_per_image if i == 0 else 3) if detected else 0):
            box = [float(rng.uniform(0, 560)), float(rng.uniform(0, 400)), *(float(v) for v in rng.uniform(5, 80, 2))]
            dets.append(_det(image_id, int(rng.choice(cat_ids)), box, float(rng.uniform(0, 0.6))))
    return gt, dets


def max_dets_case() -> Case:
    """One image with 40 objects and 150 detections, the true ones spread over the ranking: AR1 < AR10 < AR100."""
    rng = np.random.default_rng(7)
    gt: dict[str, Any] = {"images": [{"id": 1}], "categories": [{"id": 3, "name": "dot"}], "annotations": []}
    dets = []
    for j in range(40):
        box = [float(15 * (j % 10) * 4), float(100 * (j // 10)), 30.0, 30.0]
        gt["annotations"].append(_ann(j + 1, 1, 3, box))
        dets.append(_det(1, 3, _jitter(rng, box, 0.03), float(1.0 - j / 40)))
    for _ in range(110):
        dets.append(_det(1, 3, [float(rng.uniform(0, 600)), 450.0, 10.0, 10.0], float(rng.uniform(0, 1))))
    return gt, dets


CASES: dict[str, Callable[[], Case]] = {
    "crowd": lambda: random_case(1, crowd=True),
    "images_without_detections": lambda: random_case(2, undetected_images=3),
    "images_without_gt": lambda: random_case(3, empty_gt_images=3),
    "noncontiguous_ids": lambda: random_case(4, cat_ids=(1, 5, 90)),
    "single_class": lambda: random_case(5, cat_ids=(7,)),
    "max_dets_150": max_dets_case,
    "many_dets_random": lambda: random_case(6, dets_per_image=130),
    "small_medium_large": lambda: random_case(8, sizes=(6.0, 400.0)),
    "everything": lambda: random_case(
        9, images=12, crowd=True, empty_gt_images=2, undetected_images=2, dets_per_image=120, sizes=(6.0, 300.0)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_pycocotools(name: str) -> None:
    gt, dets = CASES[name]()
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    m = evaluate_coco(gt, dets)
    assert_same_as_reference(m, reference_eval(gt, dets))
    assert gt == gt_before and dets == dets_before  # inputs untouched (pycocotools writes into its copies)
    assert json.loads(json.dumps(m.to_json())) == m.to_json()


def test_cases_exercise_what_they_claim() -> None:
    m = evaluate_coco(*max_dets_case())
    assert m.stats["AR1"] < m.stats["AR10"] < m.stats["AR100"]
    m = evaluate_coco(*CASES["small_medium_large"]())
    assert all(0 < m.stats[k] < 1 for k in ("APs", "APm", "APl", "ARs", "ARm", "ARl"))
    # Crowd: the detections inside crowd regions are ignored; scored as ordinary GT they would count.
    gt, dets = CASES["crowd"]()
    inside = [d for d in dets if d["bbox"][2] == 40.0 and d["bbox"][3] == 40.0]
    assert inside
    with_inside, without = evaluate_coco(gt, dets).stats, evaluate_coco(gt, [d for d in dets if d not in inside]).stats
    for key in ("AR1", "AR10"):  # they still take up maxDets slots (pycocotools truncates before matching)
        with_inside.pop(key), without.pop(key)
    assert with_inside == without
    uncrowded = copy.deepcopy(gt)
    for a in uncrowded["annotations"]:
        a["iscrowd"] = 0
    assert evaluate_coco(uncrowded, dets).stats != evaluate_coco(gt, dets).stats
    # Detections on images without GT are false positives.
    gt, dets = CASES["images_without_gt"]()
    on_empty = [d for d in dets if d["image_id"] < 103]
    assert on_empty
    assert evaluate_coco(gt, dets).stats["AP"] < evaluate_coco(gt, [d for d in dets if d not in on_empty]).stats["AP"]
    m = evaluate_coco(*CASES["noncontiguous_ids"]())
    assert m.category_ids == (1, 5, 90) and list(m.per_class_ap) == ["class1", "class5", "class90"]


def test_empty_detections_score_zero_where_gt_exists() -> None:
    gt, _ = random_case(10, sizes=(8.0, 60.0))  # small and medium objects only
    m = evaluate_coco(gt, [])
    assert_same_as_reference(m, reference_eval(gt, []))
    assert all(v == 0.0 for k, v in m.stats.items() if k not in ("APl", "ARl"))
    assert m.stats["APl"] == m.stats["ARl"] == -1.0  # no large GT: undefined, as pycocotools reports it
    assert set(m.per_class_ap.values()) == {0.0}


def test_image_subset_and_class_without_gt() -> None:
    gt, dets = random_case(11, cat_ids=(2, 4, 6))
    gt["categories"].append({"id": 8, "name": "absent"})  # no GT at all; a detection of it anyway
    dets.append(_det(100, 8, [1.0, 1.0, 30.0, 30.0], 0.99))
    subset = [100, 103, 105]
    m = evaluate_coco(gt, dets, image_ids=subset, class_names={2: "a", 4: "b", 6: "c", 8: "absent"})
    assert_same_as_reference(m, reference_eval(gt, dets, image_ids=subset))
    assert m.per_class_ap["absent"] == -1.0 and m.num_images == 3
    assert m.num_gt[3] == 0 and sum(m.num_gt) == sum(
        1 for a in gt["annotations"] if a["image_id"] in subset and not a["iscrowd"]
    )
    names = evaluate_coco(gt, dets, class_names=["w", "x", "y", "z"]).per_class_ap
    assert list(names) == ["w", "x", "y", "z"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda gt, d: d.append(_det(999, 1, [0, 0, 5, 5], 0.5)), "image_id 999 is not an image"),
        (lambda gt, d: d.append(_det(100, 3, [0, 0, 5, 5], 0.5)), "category_id 3 is not a ground-truth category"),
        (lambda gt, d: d.append(_det(100, 1, [0, 0, 5], 0.5)), "bbox must be [x, y, w, h]"),
        (lambda gt, d: d.append(_det(100, 1, [0, 0, 5, 5], float("nan"))), "score must be a finite number"),
        (lambda gt, d: d[0].pop("score"), "missing field 'score'"),
        (lambda gt, d: gt["annotations"][1].pop("iscrowd"), "missing field 'iscrowd'"),
        (lambda gt, d: gt["annotations"][1].update(id=1), "annotation id 1 is used twice"),
        (lambda gt, d: gt.pop("categories"), "'categories' is missing"),
    ],
)
def test_bad_inputs_are_named(mutate: Callable[[dict[str, Any], list[dict[str, Any]]], Any], message: str) -> None:
    gt, dets = random_case(12)
    mutate(gt, dets)
    with pytest.raises(EvaluationInputError, match=message.replace("[", r"\[")):
        evaluate_coco(gt, dets)


def test_detections_to_coco() -> None:
    boxes = torch.tensor([[10.5, 20.25, 30.5, 60.0], [0.0, 0.0, 1.0, 2.0]])
    cmap = CategoryMap.from_pairs([(1, "a"), (5, "b"), (90, "c")])
    out = detections_to_coco(7, boxes, torch.tensor([0.9, 0.1]), torch.tensor([3, 1]), cmap.category_id_of)
    assert out == [
        {"image_id": 7, "category_id": 90, "bbox": [10.5, 20.25, 20.0, 39.75], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 2.0], "score": pytest.approx(0.1)},
    ]
    assert all(type(v) is float for d in out for v in d["bbox"])  # plain JSON-able Python floats
    same = detections_to_coco(7, boxes.numpy(), np.array([0.9, 0.1]), np.array([3, 1]), {1: 1, 2: 5, 3: 90})
    assert [d["bbox"] for d in same] == [d["bbox"] for d in out]
    assert detections_to_coco(7, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), {}) == []
    with pytest.raises(ValueError, match="label 4 has no category id"):
        detections_to_coco(7, boxes, torch.tensor([0.9, 0.1]), torch.tensor([4, 1]), cmap.category_id_of)


# ---------------------------------------------------------------------------------------------- the command


def _write_case(tmp_path: Path, gt: dict[str, Any], dets: Any) -> tuple[str, str]:
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return str(tmp_path / "gt.json"), str(tmp_path / "dets.json")


def test_cli_end_to_end(tmp_path: Path) -> None:
    gt, dets = CASES["everything"]()
    gt_path, dets_path = _write_case(tmp_path, gt, dets)
    out = tmp_path / "sub" / "metrics.json"
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "evaluate",
        "--gt",
        gt_path,
        "--detections",
        dets_path,
        "--output",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(out.read_text())
    assert list(written) == [*STAT_NAMES, "per_class_AP"]
    ref = reference_eval(gt, dets)
    assert [written[k] for k in STAT_NAMES] == [float(v) for v in ref.stats]
    assert written["per_class_AP"] == evaluate_coco(gt, dets).per_class_ap
    lines = [line for line in proc.stdout.splitlines() if line.startswith(" Average")]
    assert len(lines) == 12 and lines[0].endswith(f"= {ref.stats[0]:0.3f}")


def test_cli_reads_and_writes_s3(tmp_path: Path, s3_bucket: str) -> None:
    from pipeline.storage import read_bytes, write_bytes

    gt, dets = CASES["crowd"]()
    write_bytes(f"{s3_bucket}/gt.json", json.dumps(gt).encode())
    write_bytes(f"{s3_bucket}/dets.json", json.dumps(dets).encode())
    argv = ["--gt", f"{s3_bucket}/gt.json", "--detections", f"{s3_bucket}/dets.json"]
    assert main(["evaluate", *argv, "--output", f"{s3_bucket}/m.json"]) == 0
    assert json.loads(read_bytes(f"{s3_bucket}/m.json"))["AP"] == evaluate_coco(gt, dets).stats["AP"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "missing.json: no such file"),
        ("malformed", "gt.json: malformed JSON (Expecting value at line 1, column 12)"),
        ("not_a_list", "detections: expected a list of COCO results"),
        ("unknown_image", "detections[3]: image_id 555 is not an image of the ground truth"),
        ("unknown_category", "detections[0]: category_id 2 is not a ground-truth category (ids [1, 5, 90])"),
    ],
)
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str) -> None:
    gt, dets = random_case(13)
    gt_path, dets_path = _write_case(tmp_path, gt, dets)
    if case == "missing":
        dets_path = str(tmp_path / "missing.json")
    elif case == "malformed":
        Path(gt_path).write_text('{"images": ')
    elif case == "not_a_list":
        Path(dets_path).write_text(json.dumps({"annotations": dets}))
    elif case == "unknown_image":
        dets[3]["image_id"] = 555
        Path(dets_path).write_text(json.dumps(dets))
    else:
        dets[0]["category_id"] = 2
        Path(dets_path).write_text(json.dumps(dets))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--gt", gt_path, "--detections", dets_path, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_cli_requires_both_files(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--detections", "d.json"])
    assert exc.value.code == 2 and "--gt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- plots


def _png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize("num_classes", [3, 20])
def test_pr_plot_and_table(tmp_path: Path, num_classes: int) -> None:
    gt, dets = random_case(14, cat_ids=tuple(range(1, num_classes + 1)), images=6)
    m = evaluate_coco(gt, dets)
    path = tmp_path / "pr.png"
    assert plot_pr_curves(m, str(path)) == str(path)
    assert _png_size(path) == (int(PR_FIGSIZE[0] * PR_DPI), int(PR_FIGSIZE[1] * PR_DPI))
    table = per_class_table(m).splitlines()
    assert table[0] == "| class | category_id | gt | AP | AP50 | AP75 |" and len(table) == 2 + num_classes
    csv = per_class_table(m, "csv").splitlines()
    assert csv[1].startswith("class1,1,") and float(csv[1].split(",")[3]) == pytest.approx(
        m.per_class_ap["class1"], abs=5e-5
    )


def test_detections_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120 + 10 * i, 160, 3), dtype=np.uint8) for i in range(5)]
    images.append(rng.integers(0, 255, (90, 90), dtype=np.uint8))  # grayscale
    gts = [(np.array([[10, 10, 60, 50], [70, 20, 150, 110]], np.float32), np.array([1, 2]))] * 5
    gts.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    preds = [(torch.tensor([[12.0, 8, 58, 52]]), torch.tensor([0.87]), torch.tensor([1]))] * 6
    path = tmp_path / "grid.png"
    draw_detections_grid(images, gts, preds, ["cat", "dog"], str(path), max_images=5, cell_size=200)
    assert _png_size(path) == (3 * 200, grid_legend_height(200) + 2 * 200)  # 5 images: 3 columns, 2 rows
    draw_detections_grid(images, gts, preds, ["cat", "dog"], str(path), cell_size=150)
    assert _png_size(path) == (3 * 150, grid_legend_height(150) + 2 * 150)
    with Image.open(path) as im:  # ground truth (green) and predictions (magenta) are drawn
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (0, 200, 0) in colors and (255, 40, 200) in colors

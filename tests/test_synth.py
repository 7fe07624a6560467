"""pipeline.synth and ``dhrcnn synth``: deterministic, valid, varied COCO data, locally and on S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipeline import storage
from pipeline.coco import load_coco
from pipeline.synth import SHAPE_CLASSES, SynthConfig, render, split_indices, write_synth


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    write_synth(str(tmp_path / "a"), SynthConfig(num_images=6, seed=5))
    write_synth(str(tmp_path / "b"), SynthConfig(num_images=6, seed=5))
    write_synth(str(tmp_path / "c"), SynthConfig(num_images=6, seed=6))
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert sorted(a) == [
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        *[f"images/train/{i:06d}.jpg" for i in range(1, 7) if i - 1 not in split_indices(SynthConfig(6, 5))["val"]],
        *[f"images/val/{i:06d}.jpg" for i in range(1, 7) if i - 1 in split_indices(SynthConfig(6, 5))["val"]],
    ]
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_dataset_content_is_valid_and_varied(tmp_path: Path) -> None:
    cfg = SynthConfig(num_images=40, seed=1, val_fraction=0.25)
    summaries = {s.split: s for s in write_synth(str(tmp_path), cfg)}
    train = load_coco(summaries["train"].annotations_uri)
    val = load_coco(summaries["val"].annotations_uri)

    assert (len(train.records), len(val.records)) == (30, 10)
    train_ids, val_ids = {r.image_id for r in train.records}, {r.image_id for r in val.records}
    assert not train_ids & val_ids and train_ids | val_ids == set(range(1, 41))
    assert train.categories.category_ids == (1, 3, 7)  # non-contiguous ids, labels 1..3
    assert sum(train.drop_counts.values()) == 0 and train.num_clipped == 0  # every box valid, inside
    records = train.records + val.records
    assert 1 <= sum(r.num_boxes == 0 for r in records) <= 10  # some images without objects
    assert {int(v) for r in records for v in r.labels} == {1, 2, 3}
    sides = np.concatenate([np.minimum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1]) for r in records])
    assert sides.min() < 16 and sides.max() > 64  # small to large objects
    sizes = {(r.width, r.height) for r in records}
    assert len(sizes) > 10 and all(256 <= w <= 320 and 192 <= h <= 256 for w, h in sizes)
    assert summaries["train"].num_annotations == train.num_annotations
    assert summaries["train"].num_empty_images == sum(r.num_boxes == 0 for r in train.records)

    for split, ds in (("train", train), ("val", val)):  # files decode to the declared size
        for rec in ds.records[:4]:
            with Image.open(tmp_path / "images" / split / rec.file_name) as im:
                assert im.size == (rec.width, rec.height) and im.mode == "RGB"


def test_boxes_are_tight_around_the_drawn_shapes() -> None:
    """The last object drawn is never occluded: its box centre has its class colour, its box is tight."""
    cfg = SynthConfig(num_images=30, seed=2)
    colours = {c.category_id: np.array(c.colour, dtype=np.float32) for c in SHAPE_CLASSES}
    checked = 0
    for index in range(cfg.num_images):
        sample = render(index, cfg)
        if not sample.objects:
            continue
        obj = sample.objects[-1]
        x, y, w, h = obj.bbox
        cx, cy = x + w // 2, y + h // 2
        centre = np.median(sample.pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3), axis=0)
        nearest = min(colours, key=lambda c: np.abs(colours[c] - centre).sum())
        assert nearest == obj.category_id, (index, obj, centre)
        if obj.category_id == 1:  # a rectangle fills its box, edge to edge
            inside = sample.pixels[y : y + h, x : x + w].astype(np.float32)
            assert np.abs(inside - colours[1]).mean(axis=-1).mean() < 60
        checked += 1
    assert checked >= 20


def test_fixed_size_png_on_s3(s3_bucket: str) -> None:
    out = f"{s3_bucket}/shapes"
    summaries = write_synth(out, SynthConfig(num_images=5, seed=0, size=(64, 48), image_format="png", val_fraction=0.2))
    assert [s.split for s in summaries] == ["train", "val"]
    assert [s.num_images for s in summaries] == [4, 1]
    train = load_coco(f"{out}/annotations/instances_train.json")
    for rec in train.records:
        data = storage.read_bytes(storage.join(f"{out}/images/train", rec.file_name))
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.size) == ("PNG", (64, 48)) == ("PNG", (rec.width, rec.height))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path), "--images", "4", "--seed", "3", "--size", "96x80"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 images" in out and f"--annotations {tmp_path}/annotations/instances_train.json" in out
    doc = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert [(i["width"], i["height"]) for i in doc["images"]] == [(96, 80)]
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--images", "4", "--size", "96by80"])

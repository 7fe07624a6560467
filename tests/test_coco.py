"""pipeline.coco: validated records from COCO instances JSON, every bad input an error or a counted drop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import storage
from pipeline.coco import DROP_REASONS, CategoryMap, DatasetError, ImageRecord, load_coco, parse_coco, safe_join


def _doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 4, "file_name": "sub/b.png", "width": 50, "height": 40},
            {"id": 7, "file_name": "c.jpg", "width": 30, "height": 30},  # no annotations
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 20, 30, 40], "area": 1000.5, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0.5, 0.25, 5, 6]},
            {"id": 3, "image_id": 4, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "triangle"}, {"id": 1, "name": "rectangle"}, {"id": 3, "name": "ellipse"}],
    }
    doc.update(overrides)
    return doc


def _parse(doc: dict[str, Any], **kwargs: Any):
    return parse_coco(json.dumps(doc).encode(), "ann/instances.json", **kwargs)


def _with_annotation(**ann: Any) -> dict[str, Any]:
    base = {"id": 99, "image_id": 10, "category_id": 1, "bbox": [1, 1, 10, 10]}
    doc = _doc()
    doc["annotations"].append({**base, **ann})
    return doc


def test_records_boxes_labels_and_category_map() -> None:
    ds = _parse(_doc())
    assert [r.image_id for r in ds.records] == [4, 7, 10]
    assert ds.categories.category_ids == (1, 3, 7) and ds.categories.names == ("rectangle", "ellipse", "triangle")
    by_id = {r.image_id: r for r in ds.records}
    a = by_id[10]
    assert (a.file_name, a.width, a.height) == ("a.jpg", 100, 80)
    assert a.boxes.dtype == np.float32 and a.boxes.shape == (2, 4)
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [0.5, 0.25, 5.5, 6.25]])
    np.testing.assert_array_equal(a.labels, np.array([3, 1], dtype=np.int32))  # ids 7 -> 3, 1 -> 1
    np.testing.assert_array_equal(a.area, np.array([1000.5, 30.0], dtype=np.float32))  # given, else box area
    assert a.labels.dtype == np.int32 and a.iscrowd.dtype == np.bool_ and a.area.dtype == np.float32
    b = by_id[4]
    assert b.iscrowd.tolist() == [True] and b.labels.tolist() == [2]  # crowd boxes are kept, flagged
    empty = by_id[7]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)  # kept by default
    assert ds.num_annotations == 3 and ds.num_source_images == 3 and ds.num_source_annotations == 3
    assert set(ds.drop_counts) == set(DROP_REASONS) and sum(ds.drop_counts.values()) == 0
    assert len(ds.fingerprint) == 64
    with pytest.raises(ValueError):
        a.boxes[0, 0] = 1.0  # records are immutable


def test_drop_images_without_annotations_is_counted() -> None:
    ds = _parse(_doc(), drop_images_without_annotations=True)
    assert [r.image_id for r in ds.records] == [4, 10]
    assert ds.drop_counts["image_without_annotations"] == 1
    assert ds.drop_examples["image_without_annotations"] == (7,)


@pytest.mark.parametrize(
    ("bbox", "reason"),
    [
        ([1, 2, 3], "bbox_wrong_length"),
        ([1, 2, 3, 4, 5], "bbox_wrong_length"),
        ("1,2,3,4", "bbox_wrong_length"),
        ([1, 2, float("nan"), 4], "bbox_not_finite"),
        ([1, 2, "3", 4], "bbox_not_finite"),
        ([10, 10, -5, 4], "bbox_negative_size"),
        ([10, 10, 5, -0.1], "bbox_negative_size"),
        ([100, 10, 5, 5], "bbox_outside_image"),  # x == width: entirely to the right
        ([-20, 10, 15, 5], "bbox_outside_image"),
        ([10, 90, 5, 5], "bbox_outside_image"),
        ([10, 10, 0.5, 20], "bbox_smaller_than_1px"),
        ([99.5, 10, 20, 20], "bbox_smaller_than_1px"),  # 0.5 px wide once clipped
        ([10, 10, 0, 0], "bbox_smaller_than_1px"),
    ],
)
def test_invalid_boxes_are_dropped_and_counted(bbox: Any, reason: str) -> None:
    doc = _with_annotation(bbox=bbox)
    ds = parse_coco(json.dumps(doc, allow_nan=True).encode(), "x.json")
    assert ds.drop_counts[reason] == 1 and sum(ds.drop_counts.values()) == 1
    assert ds.drop_examples[reason] == (99,)
    assert ds.num_annotations == 3  # the others are untouched


def test_boxes_partly_outside_are_clipped() -> None:
    ds = _parse(_with_annotation(bbox=[-10, 70, 50, 30]))  # image 100x80
    rec = next(r for r in ds.records if r.image_id == 10)
    np.testing.assert_array_equal(rec.boxes[-1], [0, 70, 40, 80])
    assert ds.num_clipped == 1 and sum(ds.drop_counts.values()) == 0


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (_with_annotation(category_id=5), r"annotation id 99 \(image id 10\) has category_id 5.*known ids: 1, 3, 7"),
        (_with_annotation(image_id=123), "annotation id 99 refers to image id 123, which is not in 'images'"),
        (_with_annotation(id=1), "annotation id 1 appears twice"),
        (_with_annotation(iscrowd="0"), r"annotation id 99 \(image id 10\) has iscrowd '0'; expected 0 or 1"),
        (_with_annotation(iscrowd=2), r"annotation id 99 \(image id 10\) has iscrowd 2; expected 0 or 1"),
        (_with_annotation(iscrowd=0.5), "has iscrowd 0.5; expected 0 or 1"),
        (
            _doc(images=[*_doc()["images"], {"id": 4, "file_name": "d.jpg", "width": 5, "height": 5}]),
            "image id 4 appears twice",
        ),
        (
            _doc(images=[{"id": 1, "file_name": "a.jpg", "width": 0, "height": 5}]),
            r"image id 1 \(a.jpg\): width and height must be >= 1",
        ),
        (_doc(images=[{"id": 1, "file_name": "a.jpg", "width": 5}]), "image id 1: missing required key 'height'"),
        (_doc(images=[{"id": 1, "file_name": "a.jpg", "width": "5", "height": 5}]), "'width' must be an integer"),
        (_doc(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "category id 1 appears twice"),
        (_doc(categories=[{"id": 1}]), "missing required key 'name'"),
        ({"images": [], "annotations": []}, "missing required key 'categories'"),
        ([1, 2], "top level must be a JSON object"),
    ],
)
def test_structural_errors_name_the_file_and_the_id(doc: Any, expected: str) -> None:
    with pytest.raises(DatasetError, match=expected) as info:
        _parse(doc)
    assert str(info.value).startswith("ann/instances.json")


def test_annotation_without_bbox_is_an_error() -> None:
    doc = _doc()
    doc["annotations"].append({"id": 99, "image_id": 10, "category_id": 1})
    with pytest.raises(DatasetError, match="annotation id 99: missing required key 'bbox'"):
        _parse(doc)


@pytest.mark.parametrize(
    "file_name", ["../secret.jpg", "a/../../b.jpg", "/etc/passwd", "C:/x.jpg", "a\\b.jpg", "s3://other/x.jpg", "", "./"]
)
def test_file_names_escaping_the_image_root_are_refused(file_name: str) -> None:
    doc = _doc(images=[{"id": 5, "file_name": file_name, "width": 10, "height": 10}], annotations=[])
    with pytest.raises(DatasetError, match=r"image id 5: file_name .* relative paths under the image root"):
        _parse(doc)
    with pytest.raises(DatasetError, match="file_name"):
        safe_join("s3://bucket/images", file_name)


def test_safe_join_accepts_nested_relative_names() -> None:
    assert safe_join("s3://bucket/images/", "train/0001.jpg") == "s3://bucket/images/train/0001.jpg"
    assert safe_join("s3://bucket/images", "./train//0001.jpg") == "s3://bucket/images/train/0001.jpg"
    assert safe_join("/data/img", "a..b.jpg") == "/data/img/a..b.jpg"


@pytest.mark.parametrize("cut", [1, 100, -3])
def test_truncated_json_names_the_file(cut: int) -> None:
    data = json.dumps(_doc()).encode()[:cut]
    with pytest.raises(DatasetError, match=r"^s3://b/ann.json: not valid JSON .*truncated"):
        parse_coco(data, "s3://b/ann.json")


def test_load_from_s3_and_errors_there(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/annotations/instances_train.json"
    storage.write_bytes(uri, json.dumps(_doc()).encode())
    from_s3 = load_coco(uri)
    local = tmp_path / "instances.json"
    local.write_text(json.dumps(_doc()))
    from_disk = load_coco(str(local))
    assert from_s3.fingerprint == from_disk.fingerprint and from_s3.source_uri == uri
    assert [r.image_id for r in from_s3.records] == [r.image_id for r in from_disk.records]

    storage.write_bytes(uri, json.dumps(_doc()).encode()[:-40])
    with pytest.raises(DatasetError, match=f"{uri}: not valid JSON"):
        load_coco(uri)
    with pytest.raises(storage.ObjectNotFoundError, match=r"missing\.json"):
        load_coco(f"{s3_bucket}/annotations/missing.json")


def test_category_map_round_trip_and_lookups() -> None:
    cmap = CategoryMap.from_pairs([(7, "triangle"), (1, "rectangle"), (3, "ellipse")])
    assert cmap.num_classes == 3 and 3 in cmap and 2 not in cmap
    assert [cmap.label_of(c) for c in (1, 3, 7)] == [1, 2, 3]
    assert [cmap.category_id_of(k) for k in (1, 2, 3)] == [1, 3, 7]
    assert cmap.name_of(3) == "triangle"
    restored = CategoryMap.from_dict(json.loads(json.dumps(cmap.to_dict())))
    assert restored == cmap
    with pytest.raises(KeyError):
        cmap.category_id_of(0)  # 0 is background
    with pytest.raises(KeyError):
        cmap.label_of(2)
    tampered = cmap.to_dict()
    tampered["categories"][0]["label"] = 2
    with pytest.raises(ValueError, match="not the contiguous one"):
        CategoryMap.from_dict(tampered)


def test_image_record_checks_dtypes_and_shapes() -> None:
    good = dict(
        image_id=1,
        file_name="a.jpg",
        width=4,
        height=4,
        boxes=np.zeros((1, 4), np.float32),
        labels=np.ones(1, np.int32),
        iscrowd=np.zeros(1, bool),
        area=np.ones(1, np.float32),
    )
    assert ImageRecord(**good).num_boxes == 1
    with pytest.raises(ValueError, match="boxes must be float32"):
        ImageRecord(**{**good, "boxes": np.zeros((1, 4), np.float64)})
    with pytest.raises(ValueError, match="labels must be int32"):
        ImageRecord(**{**good, "labels": np.ones(1, np.int64)})
    with pytest.raises(ValueError, match=r"iscrowd must be bool \[2\]"):
        ImageRecord(**{**good, "boxes": np.zeros((2, 4), np.float32), "labels": np.ones(2, np.int32)})

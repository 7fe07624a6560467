"""pipeline.coco reads the instances JSON as a stream: bounded memory, one pass, the same records and
fingerprint as a whole-document parse, in any order of the top-level keys."""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import coco, storage
from pipeline.coco import DatasetError, load_coco, parse_coco
from pipeline.json_items import TopLevelLists

ROOT = Path(__file__).resolve().parents[1]


def _write_instances(path: Path, n_images: int, seed: int = 0) -> None:
    """COCO-shaped (polygons, extra keys, categories last), written element by element."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write('{"info": {"year": 2026}, "licenses": [], "images": [')
        f.write(",".join(json.dumps(_image(i, rng)) for i in range(1, n_images + 1)))
        f.write('], "annotations": [')
        ann_id = 0
        for i in range(1, n_images + 1):
            for _ in range(rng.randint(0, 12)):
                ann_id += 1
                x, y, w, h = (round(rng.uniform(-5, 400), 2) for _ in range(4))
                polygon = [round(rng.uniform(0, 400), 2) for _ in range(2 * rng.randint(4, 16))]
                ann = {"segmentation": [polygon], "area": round(w * h, 2), "iscrowd": int(rng.random() < 0.02)}
                ann.update(image_id=i, bbox=[x, y, w, h], category_id=rng.randint(1, 80), id=ann_id)
                f.write(("," if ann_id > 1 else "") + json.dumps(ann))
        f.write('], "categories": ')
        f.write(json.dumps([{"supercategory": "s", "id": c, "name": f"c{c}"} for c in range(1, 81)]) + "}")


def _image(i: int, rng: random.Random) -> dict[str, Any]:
    width, height = rng.choice([(640, 480), (480, 640), (500, 375)])
    return {"license": 1, "file_name": f"{i:012d}.jpg", "height": height, "width": width, "id": i}


def test_the_stream_gives_what_the_whole_document_parse_gives(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    _write_instances(path, 300)
    data = path.read_bytes()
    streamed = load_coco(str(path), drop_images_without_annotations=True)
    whole = coco._parse_document(data, str(path), drop_empty=True)  # json.loads, the former path
    assert streamed.fingerprint == whole.fingerprint == hashlib.sha256(data).hexdigest()
    assert dict(streamed.drop_counts) == dict(whole.drop_counts) and sum(streamed.drop_counts.values()) > 0
    assert dict(streamed.drop_examples) == dict(whole.drop_examples)
    assert (streamed.num_source_annotations, streamed.num_clipped) == (whole.num_source_annotations, whole.num_clipped)
    assert len(streamed.records) == len(whole.records) > 0
    for a, b in zip(streamed.records, whole.records, strict=True):
        assert (a.image_id, a.file_name, a.width, a.height) == (b.image_id, b.file_name, b.width, b.height)
        for name in ("boxes", "labels", "iscrowd", "area"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("order", [("categories", "images", "annotations"), ("annotations", "categories", "images")])
def test_any_order_of_the_top_level_keys(order: tuple[str, ...]) -> None:
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], "segmentation": [[1]]}],
        "categories": [{"id": 3, "name": "x"}],
    }
    ds = parse_coco(json.dumps({k: doc[k] for k in order}).encode(), "x.json")
    assert ds.records[0].labels.tolist() == [1] and ds.records[0].boxes.tolist() == [[1, 1, 5, 5]]


def test_load_coco_streams_chunks_and_never_parses_the_whole_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "instances.json"
    _write_instances(path, 200)
    chunks: list[int] = []
    read_chunks = storage.read_chunks

    def counted(uri: str, config: Any = None, *, chunk_size: int = 1 << 20):
        for chunk in read_chunks(uri, config, chunk_size=64 << 10):
            chunks.append(len(chunk))
            yield chunk

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole document was read or parsed")

    monkeypatch.setattr(storage, "read_chunks", counted)
    monkeypatch.setattr(storage, "read_bytes", refuse)
    monkeypatch.setattr(coco.json, "loads", refuse)
    ds = load_coco(str(path))
    assert sum(chunks) == path.stat().st_size and max(chunks) <= 64 << 10 and len(chunks) > 4
    assert ds.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_standard_json_falls_back_to_the_whole_document_parse() -> None:
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, math.inf, 4, 4]}],
        "categories": [{"id": 3, "name": "x"}],
    }
    ds = parse_coco(json.dumps(doc).encode(), "x.json")  # "Infinity": Python's json, not strict JSON
    assert ds.drop_counts["bbox_not_finite"] == 1
    with pytest.raises(DatasetError, match=r"x.json: not valid JSON .*\(20 bytes\)"):
        parse_coco(b'{"images": [{"id": 1', "x.json")


def test_top_level_lists_skip_fields_and_report_the_shape() -> None:
    data = b'{"a": [{"k": 1, "big": [[1, 2], {"x": 3}]}, 7], "b": {"item": 1}, "c": [[1], "s"]}'
    doc = TopLevelLists([data[:9], data[9:30], data[30:]], ["a", "b", "c"], skip={"a": ["big"]})
    assert list(doc.items()) == [("a", {"k": 1}), ("a", 7), ("c", [1]), ("c", "s")]
    assert doc.top_level == "object" and doc.lists == {"a", "c"}  # "b" is an object, not a list
    assert doc.size == len(data) and doc.sha256 == hashlib.sha256(data).hexdigest()


_CHILD = """
import resource, sys
from pipeline.coco import load_coco
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dataset = load_coco(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(dataset.records), (after - before) * 1024)
"""


def test_peak_memory_of_a_load_stays_under_twice_the_file_size(tmp_path: Path) -> None:
    """A whole-document ``json.loads`` of this file takes ~7x its size; the streamed load about 1.5x."""
    path = tmp_path / "instances.json"
    _write_instances(path, 6000)
    size = path.stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    records, growth = (int(v) for v in done.stdout.split())
    assert records == 6000
    assert growth <= 2 * size + (8 << 20), f"peak RSS grew {growth / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"

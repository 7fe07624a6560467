"""The category map kept with every dataset: COCO category id <-> contiguous label 1..K <-> name.

Labels follow torchvision's detection convention: 0 is background, the K foreground classes are 1..K in
increasing COCO category id order (so ids 1, 3, 7 become labels 1, 2, 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CategoryMap:
    """Sorted category ids and their names; label ``i + 1`` is ``category_ids[i]``.

    Build with :meth:`from_pairs` (any order) or :meth:`from_dict`; ``to_dict`` is JSON-serialisable.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    _label_of: Mapping[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise ValueError(f"CategoryMap: {len(self.category_ids)} ids but {len(self.names)} names")
        if list(self.category_ids) != sorted(set(self.category_ids)):
            raise ValueError(f"CategoryMap: category ids must be unique and sorted, got {self.category_ids}")
        object.__setattr__(self, "_label_of", {cid: i + 1 for i, cid in enumerate(self.category_ids)})

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, str]]) -> CategoryMap:
        """From ``(category_id, name)`` pairs in any order (duplicate ids raise ValueError)."""
        ordered = sorted(pairs)
        return cls(tuple(int(c) for c, _ in ordered), tuple(str(n) for _, n in ordered))

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes (background excluded)."""
        return len(self.category_ids)

    def label_of(self, category_id: int) -> int:
        """The contiguous label (1..K) of a COCO category id; KeyError if unknown."""
        return self._label_of[category_id]

    def category_id_of(self, label: int) -> int:
        """The COCO category id of a label 1..K (for writing detections back in COCO format)."""
        if not 1 <= label <= self.num_classes:
            raise KeyError(f"label {label} is outside 1..{self.num_classes}")
        return self.category_ids[label - 1]

    def name_of(self, label: int) -> str:
        self.category_id_of(label)  # range check
        return self.names[label - 1]

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._label_of

    def to_dict(self) -> dict[str, Any]:
        """``{"categories": [{"id": 3, "label": 2, "name": "ellipse"}, ...]}``."""
        return {
            "categories": [
                {"id": cid, "label": i + 1, "name": name}
                for i, (cid, name) in enumerate(zip(self.category_ids, self.names, strict=True))
            ]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoryMap:
        """Inverse of :meth:`to_dict`; checks that the stored labels are the contiguous ones."""
        entries = data["categories"]
        cmap = cls.from_pairs([(int(e["id"]), str(e["name"])) for e in entries])
        for e in entries:
            if "label" in e and int(e["label"]) != cmap.label_of(int(e["id"])):
                raise ValueError(f"category id {e['id']}: stored label {e['label']} is not the contiguous one")
        return cmap

"""The elements of a JSON document's top-level lists, one at a time, from a stream of byte chunks.

For documents too large to hold as Python objects (a COCO instances file of hundreds of MB takes several times
its size once parsed whole): :class:`TopLevelLists` parses with ``ijson`` (its C backend where installed) and
builds one list element at a time, so memory holds one element plus what the caller keeps of it. Keys of the
elements that the caller never reads (COCO's ``segmentation`` polygons, most of the file) can be skipped
without being built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import ijson

__all__ = ["JSONError", "TopLevelLists"]

JSONError = ijson.JSONError  # malformed, truncated, or outside strict JSON (NaN, Infinity, 1e400, UTF-16)

_STARTS = ("start_map", "start_array")
_ENDS = ("end_map", "end_array")


class _ChunkReader:
    """A file-like ``read`` over byte chunks, hashing (sha256) and counting what passes. Reads return at most
    the size asked: the parser turns each read into a list of events at once, so its size bounds that list."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson asks read(0) to tell bytes from text
            return b""
        if not self._pending:
            chunk = next(self._chunks, b"")
            self.sha256.update(chunk)
            self.size += len(chunk)
            self._pending = memoryview(chunk)
        end = len(self._pending) if size < 0 else size
        piece, self._pending = self._pending[:end], self._pending[end:]
        return bytes(piece)


class TopLevelLists:
    """``(key, element)`` for each element of the lists at the top-level ``keys``, in file order.

    After :meth:`items` is exhausted: ``top_level`` is the JSON type of the document (``"object"``,
    ``"array"``, ``"scalar"`` or ``None`` if empty), ``lists`` the keys among ``keys`` whose value was a list,
    ``sha256`` the hex digest and ``size`` the byte count of the whole input. ``skip``: key -> names of fields
    of its elements (objects) that are not built. Raises :data:`JSONError` where the input stops being JSON.
    """

    def __init__(
        self, chunks: Iterable[bytes], keys: Iterable[str], *, skip: dict[str, Iterable[str]] | None = None
    ) -> None:
        self._reader = _ChunkReader(chunks)
        self._keys = set(keys)
        self._skip = {f"{key}.item": frozenset(fields) for key, fields in (skip or {}).items()}
        self.top_level: str | None = None
        self.lists: set[str] = set()

    @property
    def sha256(self) -> str:
        return self._reader.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._reader.size

    def items(self) -> Iterator[tuple[str, Any]]:
        inside: str | None = None  # the key whose list is being read
        item_prefix = ""
        skip_fields: frozenset[str] = frozenset()
        builder: ijson.ObjectBuilder | None = None
        depth = 0
        skipping = skipping_dot = None
        for prefix, event, value in ijson.parse(self._reader, use_float=True):
            if builder is not None:
                if skipping is not None:
                    if prefix == skipping or prefix.startswith(skipping_dot):
                        continue
                    skipping = None
                if event == "map_key" and prefix == item_prefix and value in skip_fields:
                    skipping, skipping_dot = f"{prefix}.{value}", f"{prefix}.{value}."
                    continue
                builder.event(event, value)
                if event in _STARTS:
                    depth += 1
                elif event in _ENDS:
                    depth -= 1
                    if depth == 0:
                        yield inside, builder.value  # type: ignore[misc]
                        builder = None
                continue
            if prefix == "":
                if self.top_level is None:
                    kinds = {"start_map": "object", "start_array": "array"}
                    self.top_level = kinds.get(event, "scalar")
                continue
            if inside is None:
                if prefix in self._keys and event == "start_array" and self.top_level == "object":
                    inside, item_prefix = prefix, f"{prefix}.item"
                    skip_fields = self._skip.get(item_prefix, frozenset())
                    self.lists.add(prefix)
                continue
            if prefix == inside and event == "end_array":
                inside = None
            elif prefix == item_prefix:
                if event in _STARTS:
                    builder, depth = ijson.ObjectBuilder(), 1
                    builder.event(event, value)
                else:
                    yield inside, value
        while self._reader.read():  # the hash and size cover the whole input, should the parser stop early
            pass

"""Turn a columnar batch of transformed rows into the detector's inputs, and map boxes back.

The contract with ``model/`` (torchvision detection convention, minus resizing, which the pipeline does):

* images: ``list`` of uint8 ``[3, H, W]`` RGB tensors, already resized, of varying ``H, W`` (channels-last
  memory, like torchvision's ``pil_to_tensor``); the model normalises and pads them itself.
* targets: one ``dict`` per image:

  ================ ======= ====== ==========================================================
  key              dtype   shape  meaning
  ================ ======= ====== ==========================================================
  ``boxes``        float32 [N, 4] xyxy in pixels of the resized (and possibly flipped) image
  ``labels``       int64   [N]    contiguous classes 1..K (0 is background, never present)
  ``image_id``     int64   []     COCO image id
  ``orig_size``    int64   [2]    (H, W) of the original image (after EXIF orientation)
  ``scale_factor`` float32 [2]    (sx, sy) = resized / original, per axis
  ``flipped``      bool    []     whether the image was flipped horizontally after resizing
  ``iscrowd``      bool    [N]    evaluation stream only: crowd regions (training drops them)
  ================ ======= ====== ==========================================================

A tuple, not a dict of lists: Ray concatenates dicts of tensors across a batch, which fails for ragged images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Columns of the transformed stream (see pipeline.stream): what collate reads.
STREAM_COLUMNS = (
    "image_id",
    "image",
    "boxes",
    "labels",
    "orig_height",
    "orig_width",
    "scale_x",
    "scale_y",
    "flipped",
)


def collate(batch: Mapping[str, Sequence[Any]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Build ``(images, targets)`` from a columnar batch of the transformed stream.

    Args:
        batch: column name -> per-row values, as Ray Data's ``iter_batches(batch_format="numpy")`` yields:
            ``image`` uint8 ``[h, w, 3]`` per row, ``boxes`` float32 ``[4 N]`` (flattened xyxy), ``labels``
            ``[N]`` in 1..K, scalar ``image_id``, ``orig_height``, ``orig_width``, ``scale_x``, ``scale_y``,
            ``flipped``, and optionally ``iscrowd`` ``[N]``.

    Returns:
        ``(images, targets)``: ``images[i]`` uint8 ``[3, h, w]``, owning its memory, laid out channels-last
        (a permuted view of the HWC copy; ``.contiguous()`` if a kernel needs CHW order); ``targets[i]`` as in
        the module docstring.
    """
    missing = [c for c in STREAM_COLUMNS if c not in batch]
    if missing:
        raise KeyError(f"collate: batch lacks columns {missing}; got {sorted(batch)}")
    images: list[Tensor] = []
    targets: list[dict[str, Tensor]] = []
    has_crowd = "iscrowd" in batch
    for i in range(len(batch["image_id"])):
        pixels = np.asarray(batch["image"][i])
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(
                f"collate: image id {int(batch['image_id'][i])}: expected uint8 [H, W, 3], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
        # A private copy (the batch's arrays are read-only views of Ray's object store) seen as [3, h, w]: a
        # channels-last view, as torchvision's pil_to_tensor returns; a CHW transposing copy costs 20x more.
        images.append(torch.from_numpy(np.array(pixels, order="C")).permute(2, 0, 1))
        boxes = np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4)
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(np.asarray(batch["labels"][i], dtype=np.int64).copy()),
            "image_id": torch.tensor(int(batch["image_id"][i]), dtype=torch.int64),
            "orig_size": torch.tensor([int(batch["orig_height"][i]), int(batch["orig_width"][i])], dtype=torch.int64),
            "scale_factor": torch.tensor([float(batch["scale_x"][i]), float(batch["scale_y"][i])], dtype=torch.float32),
            "flipped": torch.tensor(bool(batch["flipped"][i]), dtype=torch.bool),
        }
        if has_crowd:
            target["iscrowd"] = torch.from_numpy(np.asarray(batch["iscrowd"][i], dtype=np.bool_).copy())
        if target["labels"].shape[0] != boxes.shape[0]:
            raise ValueError(
                f"collate: image id {int(target['image_id'])}: {boxes.shape[0]} boxes but "
                f"{target['labels'].shape[0]} labels"
            )
        targets.append(target)
    return images, targets


def unscale_boxes(boxes: Tensor, target: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """Map float ``[N, 4]`` xyxy boxes in resized-image pixels back to the original image.

    Undoes the flip (if ``target["flipped"]``) and the per-axis resize of ``target["scale_factor"]``, using
    ``target["orig_size"]`` (H, W). Works in float64 internally; returns ``[N, 4]`` of ``dtype``.
    """
    sx, sy = (float(v) for v in target["scale_factor"])
    orig_w = float(target["orig_size"][1])
    b = boxes.detach().to(torch.float64).reshape(-1, 4)
    out = b / torch.tensor([sx, sy, sx, sy], dtype=torch.float64, device=b.device)
    if bool(target["flipped"]):
        out = torch.stack([orig_w - out[:, 2], out[:, 1], orig_w - out[:, 0], out[:, 3]], dim=1)
    return out.to(dtype)

"""Box delta coder: torchvision's ``BoxCoder`` with mmdet's clamp and float32 decoding.

mmdet's ``DeltaXYWHBBoxCoder`` uses stds where torchvision uses weights = 1/stds, and clamps the
log-size deltas on both sides (±|log(16/1000)|); torchvision clamps only from above. Decoding always
runs in float32: under autocast the deltas may be bf16/fp16 and torchvision would cast the reference
boxes down to that precision (several pixels of error at 1333 px).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class DeltaXYWHBoxCoder(BoxCoder):
    """Encode/decode ``(dx, dy, dw, dh)`` deltas for xyxy boxes (no +1), normalised by ``stds``.

    ``decode_single(deltas [N, 4·C], boxes [N, 4]) -> [N, 4·C]`` float32.
    """

    def __init__(self, stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__(weights=tuple(1.0 / s for s in stds), bbox_xform_clip=BBOX_XFORM_CLIP)
        self.stds = tuple(float(s) for s in stds)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        rel_codes = rel_codes.float()
        _, _, ww, wh = self.weights
        low = torch.full((4,), -math.inf, device=rel_codes.device)
        low[2] = -self.bbox_xform_clip * ww
        low[3] = -self.bbox_xform_clip * wh
        rel_codes = torch.maximum(rel_codes.view(rel_codes.shape[0], -1, 4), low).view_as(rel_codes)
        return super().decode_single(rel_codes, boxes.float())

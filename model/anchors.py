"""mmdet's ``AnchorGenerator``: unrounded base anchors and fixed strides.

torchvision's ``AnchorGenerator`` rounds its base anchors and derives each level's stride as
``image_size // feature_size`` (61 instead of 64 on P6 when P5 has an odd size), so it cannot reproduce
mmdet's anchors. This module keeps torchvision's calling convention (``forward(image_list, features)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList


class MMDetAnchorGenerator(nn.Module):
    """Anchors of size ``stride·scale`` with ratios ``h/w``, centred on ``(x·stride, y·stride)``.

    Row order per level is ``(y·W + x)·A + a`` with ``a`` running over ratios (scale-major), the same
    layout as torchvision's ``RPNHead`` outputs after ``permute(0, 2, 3, 1)``.
    """

    def __init__(
        self,
        strides: tuple[int, ...] = (4, 8, 16, 32, 64),
        scales: tuple[float, ...] = (8.0,),
        ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        for i, base in enumerate(self.base_anchors()):
            self.register_buffer(f"base_anchors_{i}", base, persistent=False)

    def num_anchors_per_location(self) -> list[int]:
        return [len(self.scales) * len(self.ratios)] * len(self.strides)

    def base_anchors(self) -> list[Tensor]:
        """Per level ``[A, 4]`` float32 anchors centred on (0, 0), exactly mmdet's float32 arithmetic."""
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        scales = torch.tensor(self.scales, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        out = []
        for stride in self.strides:
            ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
            hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
            out.append(torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1))
        return out

    def grid_anchors(self, feature_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``[H_l·W_l·A, 4]`` float32 anchors (xyxy, input pixels) for ``(H_l, W_l)`` grids."""
        out = []
        for level, ((feat_h, feat_w), stride) in enumerate(zip(feature_sizes, self.strides, strict=True)):
            base = getattr(self, f"base_anchors_{level}").to(device)
            shift_x = torch.arange(feat_w, device=device, dtype=torch.float32) * stride
            shift_y = torch.arange(feat_h, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)
            out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
        return out

    def valid_flags(
        self, feature_sizes: list[tuple[int, int]], pad_shape: tuple[int, int], device: torch.device
    ) -> Tensor:
        """``[sum_l H_l·W_l·A]`` bool: anchor positions inside this image's own padded extent (mmdet)."""
        num_base = len(self.scales) * len(self.ratios)
        flags = []
        for (feat_h, feat_w), stride in zip(feature_sizes, self.strides, strict=True):
            valid_h = min(math.ceil(pad_shape[0] / stride), feat_h)
            valid_w = min(math.ceil(pad_shape[1] / stride), feat_w)
            vy = torch.arange(feat_h, device=device) < valid_h
            vx = torch.arange(feat_w, device=device) < valid_w
            valid = (vy[:, None] & vx[None, :]).reshape(-1)
            flags.append(valid[:, None].expand(-1, num_base).reshape(-1))
        return torch.cat(flags)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """One ``[sum_l H_l·W_l·A, 4]`` tensor per image (identical for every image of the batch)."""
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        anchors = torch.cat(self.grid_anchors(sizes, feature_maps[0].device))
        return [anchors for _ in range(len(image_list.image_sizes))]

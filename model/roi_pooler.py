"""Multi-level RoIAlign for the two branches of the Double-Head (mmdet ``SingleRoIExtractor``).

Each RoI is pooled from the FPN level chosen by its *original* size,
``floor(log2(sqrt(w·h) / finest_scale + 1e-6))`` clamped to the available levels, with
``torchvision.ops.roi_align(aligned=True, sampling_ratio=0)``. Extra scale factors (1.3 for the
regression branch) enlarge the RoI about its centre, without clipping, and pool it at the same level.
torchvision's ``MultiScaleRoIAlign`` uses ``aligned=False`` and picks the level of the box it pools.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


def rois_from_boxes(boxes: list[Tensor]) -> Tensor:
    """``[sum_i N_i, 5]`` RoIs ``(batch_index, x1, y1, x2, y2)`` from per-image ``[N_i, 4]`` boxes."""
    return torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)], dim=0)


def rescale_rois(rois: Tensor, scale: float) -> Tensor:
    """Scale ``[N, 5]`` RoIs by ``scale`` about their centres (mmdet ``roi_rescale``; no clipping)."""
    if scale == 1.0:
        return rois
    cx = (rois[:, 1] + rois[:, 3]) * 0.5
    cy = (rois[:, 2] + rois[:, 4]) * 0.5
    w = (rois[:, 3] - rois[:, 1]) * scale
    h = (rois[:, 4] - rois[:, 2]) * scale
    return torch.stack([rois[:, 0], cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], dim=1)


class LevelRoIPooler(nn.Module):
    """``forward(features, boxes) -> tuple`` of ``[sum_i N_i, C, S, S]`` features, one per scale factor.

    Args:
        featmap_names: the feature-dict keys of P2..P5 (strides 4..32), finest first.
        strides: stride of each of those maps.
        output_size: S (7).
        finest_scale: mmdet's ``finest_scale`` (56): RoIs smaller than 112 px go to the finest level.
        scale_factors: one output per factor, e.g. ``(1.0, 1.3)`` for the cls and reg branches.
        sampling_ratio: samples per bin side; 0 = adaptive ``ceil(roi / output_size)`` (mmdet; exact parity),
            2 = torchvision's detection default (cheaper backward on large RoIs).
    """

    def __init__(
        self,
        featmap_names: tuple[str, ...] = ("0", "1", "2", "3"),
        strides: tuple[int, ...] = (4, 8, 16, 32),
        output_size: int = 7,
        finest_scale: float = 56.0,
        scale_factors: tuple[float, ...] = (1.0,),
        sampling_ratio: int = 0,
    ) -> None:
        super().__init__()
        self.featmap_names = tuple(featmap_names)
        self.strides = tuple(strides)
        self.output_size = output_size
        self.finest_scale = finest_scale
        self.scale_factors = tuple(scale_factors)
        self.sampling_ratio = sampling_ratio

    def levels(self, rois: Tensor) -> Tensor:
        """``[N]`` int64 level index (0 = finest) of ``[N, 5]`` RoIs."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvl = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return lvl.clamp(min=0, max=len(self.strides) - 1).long()

    def pool(self, features: list[Tensor], rois_per_scale: list[Tensor], levels: Tensor) -> list[Tensor]:
        """Pool each ``[N, 5]`` RoI set at ``levels``; one ``roi_align`` call per level for all sets."""
        n = levels.shape[0]
        num_sets = len(rois_per_scale)
        first = features[0]
        out = first.new_zeros((num_sets * n, first.shape[1], self.output_size, self.output_size))
        all_rois = torch.cat(rois_per_scale).to(first.dtype)
        all_levels = levels.repeat(num_sets)
        for lvl, (feat, stride) in enumerate(zip(features, self.strides, strict=True)):
            idx = torch.where(all_levels == lvl)[0]
            if idx.numel() == 0:
                continue
            pooled = roi_align(
                feat, all_rois[idx], self.output_size, 1.0 / stride, sampling_ratio=self.sampling_ratio, aligned=True
            )
            out[idx] = pooled.to(out.dtype)
        return [out[i * n : (i + 1) * n] for i in range(num_sets)]

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor]) -> tuple[Tensor, ...]:
        feats = [features[name] for name in self.featmap_names]
        rois = rois_from_boxes(boxes)
        levels = self.levels(rois)
        return tuple(self.pool(feats, [rescale_rois(rois, s) for s in self.scale_factors], levels))

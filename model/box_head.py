"""Box heads: the Double-Head (fc branch classifies, conv branch regresses), its Ext variant, and the
FPN baseline's two-fc head. Built from torchvision parts (``TwoMLPHead``, ``Bottleneck``,
``Conv2dNormActivation``) with mmdet's structure and initialisation (spec §1.7–1.8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.resnet import Bottleneck
from torchvision.ops import Conv2dNormActivation

from model.outputs import BoxHeadOutput


def softmax_scores(out: BoxHeadOutput) -> Tensor:
    """``[N, K+1]`` float32 class probabilities (column 0 = background) from ``out.cls_logits``."""
    return torch.softmax(out.cls_logits.float(), dim=1)


def fuse_ext_scores(cls_logits_fc: Tensor, cls_logits_conv: Tensor) -> Tensor:
    """Double-Head-Ext complementary fusion on softmax probabilities: ``s_fc + s_conv·(1 − s_fc)``.

    ``[N, K+1]`` logits each -> ``[N, K+1]`` float32 fused scores (column 0 is background and is not used).
    """
    s_fc = torch.softmax(cls_logits_fc.float(), dim=1)
    s_conv = torch.softmax(cls_logits_conv.float(), dim=1)
    return s_fc + s_conv * (1 - s_fc)


class BasicResBlock(nn.Module):
    """mmdet ``BasicResBlock``: ``relu(BN(conv1x1(relu(BN(conv3x3 x)))) + BN(conv1x1 x))``, no conv bias.

    ``[N, C_in, S, S] -> [N, C_out, S, S]``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = Conv2dNormActivation(in_channels, in_channels, 3, activation_layer=nn.ReLU)
        self.conv2 = Conv2dNormActivation(in_channels, out_channels, 1, activation_layer=None)
        self.conv_identity = Conv2dNormActivation(in_channels, out_channels, 1, activation_layer=None)
        self.relu = nn.ReLU(inplace=True)
        for conv in (self.conv1[0], self.conv2[0], self.conv_identity[0]):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.conv_identity(x))


def _init_predictors(cls_layers: list[nn.Linear], reg_layers: list[nn.Linear]) -> None:
    for layer in cls_layers:
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)
    for layer in reg_layers:
        nn.init.normal_(layer.weight, std=0.001)
        nn.init.zeros_(layer.bias)


def _init_fc_branch(fc_branch: TwoMLPHead) -> None:
    for layer in (fc_branch.fc6, fc_branch.fc7):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)


class DoubleHeadBoxHead(nn.Module):
    """Double-Head box head for ``K`` classes on ``S×S`` RoI features of ``C`` channels.

    ``forward(x_cls [N, C, S, S], x_reg [N, C, S, S]) -> BoxHeadOutput`` with ``cls_logits [N, K+1]``
    (background column 0) from the fc branch and ``box_deltas [N, 4K]`` from the conv branch. With
    ``ext=True`` (Double-Head-Ext) the conv branch also classifies (``cls_logits_conv``) and the fc branch
    also regresses (``box_deltas_fc``), and :meth:`class_scores` fuses the two classifiers.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        roi_size: int = 7,
        conv_channels: int = 1024,
        num_conv_blocks: int = 4,
        fc_channels: int = 1024,
        ext: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.res_block = BasicResBlock(in_channels, conv_channels)
        self.conv_branch = nn.Sequential(
            *[Bottleneck(conv_channels, conv_channels // 4) for _ in range(num_conv_blocks)]
        )
        self.avg_pool = nn.AvgPool2d(roi_size)
        self.fc_branch = TwoMLPHead(in_channels * roi_size * roi_size, fc_channels)
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(conv_channels, 4 * num_classes)
        self.ext_conv_cls = nn.Linear(conv_channels, num_classes + 1) if ext else None
        self.ext_fc_reg = nn.Linear(fc_channels, 4 * num_classes) if ext else None
        _init_fc_branch(self.fc_branch)
        _init_predictors(
            [m for m in (self.fc_cls, self.ext_conv_cls) if m is not None],
            [m for m in (self.fc_reg, self.ext_fc_reg) if m is not None],
        )

    def forward(self, x_cls: Tensor, x_reg: Tensor) -> BoxHeadOutput:
        x_conv = self.avg_pool(self.conv_branch(self.res_block(x_reg))).flatten(1)
        x_fc = self.fc_branch(x_cls)
        return BoxHeadOutput(
            cls_logits=self.fc_cls(x_fc),
            box_deltas=self.fc_reg(x_conv),
            cls_logits_conv=None if self.ext_conv_cls is None else self.ext_conv_cls(x_conv),
            box_deltas_fc=None if self.ext_fc_reg is None else self.ext_fc_reg(x_fc),
        )

    def class_scores(self, out: BoxHeadOutput) -> Tensor:
        """``[N, K+1]`` float32 test-time probabilities: the fc branch's softmax, or for Double-Head-Ext its
        complementary fusion with the conv branch's (:func:`fuse_ext_scores`)."""
        if out.cls_logits_conv is None:
            return softmax_scores(out)
        return fuse_ext_scores(out.cls_logits, out.cls_logits_conv)


class TwoFCBoxHead(nn.Module):
    """The FPN baseline head (mmdet ``Shared2FCBBoxHead``): two shared fcs, then cls and class-specific reg.

    ``forward(x [N, C, S, S], x_reg=None) -> BoxHeadOutput`` (``x_reg`` is ignored: one RoI scale);
    ``class_scores(out) -> [N, K+1]`` softmax probabilities.
    """

    def __init__(self, in_channels: int, num_classes: int, roi_size: int = 7, fc_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc_branch = TwoMLPHead(in_channels * roi_size * roi_size, fc_channels)
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        _init_fc_branch(self.fc_branch)
        _init_predictors([self.fc_cls], [self.fc_reg])

    def forward(self, x: Tensor, x_reg: Tensor | None = None) -> BoxHeadOutput:
        h = self.fc_branch(x)
        return BoxHeadOutput(cls_logits=self.fc_cls(h), box_deltas=self.fc_reg(h))

    def class_scores(self, out: BoxHeadOutput) -> Tensor:
        """``[N, K+1]`` float32 softmax probabilities (column 0 = background)."""
        return softmax_scores(out)

"""ResNet + FPN backbone from torchvision parts, frozen as mmdet does.

``BackboneWithFPN`` over a torchvision ResNet returns ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``
with P6 = ``max_pool2d(P5, 1, 2)`` (torchvision ``LastLevelMaxPool``, the same op as mmdet's ``num_outs=5``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

RESNETS = {
    18: resnet.resnet18,
    34: resnet.resnet34,
    50: resnet.resnet50,
    101: resnet.resnet101,
    152: resnet.resnet152,
}
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")


class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (mmdet ``norm_eval=True``).

    Affine parameters still train; statistics never update. Same state-dict keys as ``nn.BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He, 2018), the usual choice to train from scratch with small batches."""
    return nn.GroupNorm(32, num_channels)


NORM_LAYERS = {"bn_eval": EvalBatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": group_norm}


def load_imagenet_weights(body: resnet.ResNet, path: str | Path) -> None:
    """Load a local torchvision ImageNet ResNet checkpoint (``fc.*`` ignored) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {path} does not exist. Nothing is downloaded at run time: copy the "
            "torchvision ImageNet checkpoint (e.g. resnet50-0676ba61.pth from torchvision's model hub) to "
            "this path, or set backbone.weights to null to start from random weights."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"backbone weights {path} do not fit a ResNet of this depth: {err}") from err
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {path} do not fit a ResNet of this depth: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


def freeze_stages(body: nn.Module, frozen_stages: int) -> None:
    """``requires_grad=False`` on the stem (``frozen_stages ≥ 0``) and layer1..layerN (mmdet semantics)."""
    for name in STAGES[: frozen_stages + 1]:
        for mod_name in (name, "bn1") if name == "conv1" else (name,):
            for p in getattr(body, mod_name).parameters():
                p.requires_grad_(False)


def build_backbone(
    depth: int = 50,
    norm: str = "bn_eval",
    frozen_stages: int = 1,
    fpn_channels: int = 256,
    weights: str | None = None,
) -> BackboneWithFPN:
    """ResNet-``depth`` body + FPN with mmdet's Xavier-uniform FPN init. ``[B,3,H,W] -> dict of 5 maps``."""
    body = RESNETS[depth](weights=None, norm_layer=NORM_LAYERS[norm])
    if weights is not None:
        load_imagenet_weights(body, weights)
    freeze_stages(body, frozen_stages)
    expansion = 4 if depth >= 50 else 1
    in_channels = [64 * expansion * 2**i for i in range(4)]
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=in_channels,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    for m in backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return backbone

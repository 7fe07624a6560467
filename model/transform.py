"""Input normalisation and padding (never resizing: the data pipeline resizes)."""

from __future__ import annotations

from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class NormalizePad(GeneralizedRCNNTransform):
    """torchvision's transform minus the resize: ``(x − mean) / std`` on the 0–255 scale, then zero
    padding (after normalisation) to a multiple of ``size_divisible``. uint8 or float images accepted.
    """

    def __init__(
        self,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        size_divisible: int = 32,
    ) -> None:
        super().__init__(
            min_size=1,
            max_size=1,
            image_mean=list(image_mean),
            image_std=list(image_std),
            size_divisible=size_divisible,
        )

    def normalize(self, image: Tensor) -> Tensor:
        return super().normalize(image if image.is_floating_point() else image.float())

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result

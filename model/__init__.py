"""Double-Head Faster R-CNN (Wu et al., CVPR 2020) on torchvision components.

``from model import build_detector``; see :mod:`model.config` for presets and options. This package
knows nothing of Ray, MLflow or the data pipeline.
"""

from model.build import build_detector, build_model
from model.config import ModelConfig, load_model_config, model_config
from model.detector import DoubleHeadRCNN
from model.losses import BoxHeadOutput

__all__ = [
    "BoxHeadOutput",
    "DoubleHeadRCNN",
    "ModelConfig",
    "build_detector",
    "build_model",
    "load_model_config",
    "model_config",
]

"""Double-Head Faster R-CNN (Wu et al., CVPR 2020) on torchvision components.

``from model import build_detector``; see :mod:`model.config` for presets and options. The model returns raw
outputs (:mod:`model.outputs`); :func:`build_criterion` builds the losses that score them. This package knows
nothing of Ray, MLflow or the data pipeline.
"""

from model.build import build_criterion, build_detector, build_model
from model.config import ModelConfig, load_model_config, model_config
from model.criterion import DetectionCriterion
from model.detector import DoubleHeadRCNN
from model.outputs import BoxHeadOutput, DetectorOutputs

__all__ = [
    "BoxHeadOutput",
    "DetectionCriterion",
    "DetectorOutputs",
    "DoubleHeadRCNN",
    "ModelConfig",
    "build_criterion",
    "build_detector",
    "build_model",
    "load_model_config",
    "model_config",
]

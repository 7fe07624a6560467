"""The detector pyfunc's MLflow "model from code" file: MLflow runs it to build the model object, when the model
is logged and at every load (``mlflow.pyfunc.load_model``, ``mlflow models serve``), instead of unpickling one.

:func:`jobs.mlflow.pyfunc_model.log_detector` logs this file as ``python_model``; MLflow copies it next to the
``MLmodel`` file. Where the project is not installed, ``jobs`` is imported from the model's own ``code/`` copy.
The object holds no state: :meth:`~jobs.mlflow.pyfunc_model.DetectorModel.load_context` builds the detector from the
``detector`` (``detector.json``) and ``weights`` (a state dict, ``torch.load(weights_only=True)``) artifacts.
"""

import mlflow.models

from jobs.mlflow.pyfunc_model import DetectorModel

mlflow.models.set_model(DetectorModel())

"""The trained detector as an MLflow pyfunc: code plus a state dict, nothing pickled.

What is logged (:func:`log_detector`):

* ``pyfunc_entry.py``: MLflow's "model from code" file (:mod:`jobs.mlflow.pyfunc_entry`), which builds the
  :class:`DetectorModel` at load time instead of unpickling one (no cloudpickle, nothing that runs on unpickling).
* ``artifacts/weights.pt``: ``torch.save`` of a plain ``{name: tensor}`` state dict, loaded back with
  ``torch.load(weights_only=True)``.
* ``artifacts/detector.json``: ``{"format", "model_config", "categories", "preprocessing", "metrics",
  "training_config"}``: the resolved :class:`~model.config.ModelConfig`, the dataset's category map (COCO id
  <-> label 1..K <-> name), the evaluation resize of the training run, its metrics, and its config (secrets
  removed).
* ``code/``: the ``model``, ``pipeline`` and ``jobs`` packages, so the model loads and serves where the project
  is not installed (``mlflow models serve``).

Input (a pandas DataFrame; ``mlflow models serve`` receives it as JSON)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG/PNG file>"], ...]}}

Python callers may also put raw encoded ``bytes`` or RGB uint8 ``[H, W, 3]`` numpy arrays in the column. Each
image is decoded (EXIF orientation applied), resized with the run's evaluation resize and detected by
:class:`jobs.evaluate.predictor.Predictor` (batched only with images of its padded shape, so results do not depend on
the batch), its boxes mapped back to the original image. Output: one row per
image with ``boxes`` (list of ``[x1, y1, x2, y2]`` in original-image pixels), ``scores`` (descending),
``labels`` (1..K), ``category_ids`` (the dataset's ids) and ``category_names``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model

import jobs
import model as model_package
import pipeline
from jobs.denormals import flush_denormals
from jobs.evaluate.predictor import Predictor
from jobs.mlflow.uri import tracking_uri_scope
from jobs.redact import redact_config
from model.build import build_model
from model.config import ModelConfig
from model.typed_config import from_mapping
from pipeline.categories import CategoryMap
from pipeline.decode import decode_image
from pipeline.transforms import ResizeConfig

FORMAT = "dhrcnn-pyfunc/1"  # the detector pyfunc's marker: MLmodel metadata.dhrcnn_format, detector.json format
OUTPUT_COLUMNS = ("boxes", "scores", "labels", "category_ids", "category_names")
_REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pandas", "pyyaml", "mlflow")
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")  # the model-from-code file, see jobs/mlflow/pyfunc_entry.py


def _image_from_value(value: Any, index: int) -> np.ndarray:
    """One input cell -> RGB uint8 ``[H, W, 3]``: base64 str (optionally a ``data:`` URL), bytes, or array."""
    where = f"input row {index}"
    if isinstance(value, np.ndarray) and value.dtype != object:
        array = value[:, :, None] if value.ndim == 2 else value
        if array.ndim != 3 or array.shape[2] not in (1, 3) or array.dtype != np.uint8:
            raise ValueError(f"{where}: expected an RGB uint8 [H, W, 3] array, got {array.dtype} {list(value.shape)}")
        return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{where}: the image string is not valid base64 ({err})") from err
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise ValueError(
            f"{where}: expected base64 image bytes (str), raw bytes or an RGB uint8 array, got {type(value).__name__}"
        )
    return decode_image(value, image_id=index, file_name=f"input row {index}")


def _input_images(model_input: Any) -> list[Any]:
    """The images of a DataFrame's / mapping's ``image`` column, or of a plain list. A cell holding a list of
    images (MLflow turns the ``{"inputs": {"image": [...]}}`` JSON form into one such row) is expanded."""
    if isinstance(model_input, pd.DataFrame | Mapping):
        if "image" not in model_input:
            raise ValueError(f"expected a column 'image', got {list(model_input)}")
        column = model_input["image"]
    else:
        column = model_input
    if isinstance(column, str | bytes) or (isinstance(column, np.ndarray) and column.ndim != 1):
        column = [column]
    images: list[Any] = []
    for cell in column:
        nested = isinstance(cell, list | tuple) or (isinstance(cell, np.ndarray) and cell.ndim == 1)
        images.extend(cell if nested else [cell])
    return images


class DetectorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: created by :mod:`jobs.mlflow.pyfunc_entry` (MLflow's model from code), built in
    :meth:`load_context` from ``detector.json`` and ``weights.pt``. After loading: ``detector`` (the torch module,
    eval mode), ``categories``, ``resize``, ``spec``, and ``predictor`` (the
    :class:`~jobs.evaluate.predictor.Predictor` that runs it).

    It runs on the GPU when one is visible; :meth:`to` moves it.
    """

    def load_context(self, context: Any) -> None:
        spec = json.loads(Path(context.artifacts["detector"]).read_text())
        if spec.get("format") != FORMAT:
            raise ValueError(f"detector.json: expected format {FORMAT!r}, got {spec.get('format')!r}")
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            flush_denormals()  # the serving process runs the detector on CPU (jobs/denormals.py)
        self.categories = CategoryMap.from_dict(spec["categories"])
        self.resize = from_mapping(ResizeConfig, spec["preprocessing"]["resize"], "preprocessing.resize")
        cfg = from_mapping(ModelConfig, spec["model_config"], "model")
        detector = build_model(cfg)
        check_weights(Path(context.artifacts["weights"]), spec.get("weights_sha256"))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        detector.load_state_dict(state)
        self.detector = detector.to(self.device).eval()
        self.predictor = Predictor(self.detector, self.resize, device=self.device)

    def to(self, device: str | torch.device) -> DetectorModel:
        """Move the detector to ``device`` (``"cpu"``, ``"cuda:0"``); returns ``self``."""
        self.device = torch.device(device)
        self.detector.to(self.device)
        self.predictor = Predictor(self.detector, self.resize, device=self.device)
        return self

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """``model_input``: DataFrame with column ``image`` (see the module docstring). Returns a DataFrame with
        one row per image and the columns of ``OUTPUT_COLUMNS``; boxes in original-image pixels."""
        images = [_image_from_value(value, index) for index, value in enumerate(_input_images(model_input))]
        rows = [found.to_row(self.categories) for found in self.predictor(images)]
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(AnyType(), "image")])
    outputs = Schema(
        [
            ColSpec(Array(Array(DataType.double)), "boxes"),
            ColSpec(Array(DataType.double), "scores"),
            ColSpec(Array(DataType.long), "labels"),
            ColSpec(Array(DataType.long), "category_ids"),
            ColSpec(Array(DataType.string), "category_names"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def _input_example() -> pd.DataFrame:
    """One 48x32 PNG, base64-encoded, as the serving example."""
    from PIL import Image

    pixels = (np.indices((32, 48)).sum(axis=0) * 4 % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, axis=2)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def pip_requirements() -> list[str]:
    """``name==version`` of the serving dependencies as installed here (local ``+cu130`` tags dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]


def _write_artifacts(
    folder: Path,
    detector: torch.nn.Module,
    spec: dict[str, Any],
) -> dict[str, str]:
    weights = folder / "weights.pt"
    module = getattr(detector, "module", detector)  # DistributedDataParallel
    module = getattr(module, "_orig_mod", module)  # torch.compile
    torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, weights)
    spec["weights_sha256"] = file_sha256(weights)
    spec_path = folder / "detector.json"
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
    code = folder / "code"
    for package in (model_package, pipeline, jobs):
        source = Path(package.__file__).parent
        shutil.copytree(source, code / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return {"weights": str(weights), "detector": str(spec_path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights(path: Path, expected: str | None) -> None:
    """Refuse weights whose sha256 is not ``expected`` (recorded when the model was logged; ``None``: a model
    logged before hashes were recorded)."""
    if expected is not None and (found := file_sha256(path)) != expected:
        raise ValueError(
            f"{path.name}: sha256 {found[:16]}… is not the {expected[:16]}… recorded when the model was logged: the "
            "weights were changed after logging; load the model from a trusted copy"
        )


def log_detector(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    categories: Mapping[str, Any] | CategoryMap,
    resize_cfg: Mapping[str, Any] | ResizeConfig,
    metrics: Mapping[str, float],
    training_config: Mapping[str, Any],
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    name: str = "model",
) -> str:
    """Log ``model`` as a pyfunc to run ``run_id`` (``None``: MLflow's active run); returns the logged model's
    URI (``models:/m-...``). Registering it is :func:`jobs.mlflow.registry.register_detector`'s job (or
    :meth:`jobs.mlflow.tracking.Tracker.log_detector`, which does both). ``metrics`` are stored in ``detector.json``."""
    cmap = categories if isinstance(categories, CategoryMap) else CategoryMap.from_dict(categories)
    if cmap.num_classes != model_cfg.num_classes:
        raise ValueError(f"category map has {cmap.num_classes} classes but the model {model_cfg.num_classes}")
    resize = dataclasses.asdict(resize_cfg) if isinstance(resize_cfg, ResizeConfig) else dict(resize_cfg)
    from_mapping(ResizeConfig, resize, "resize")  # validate now, not at load time
    config = model_cfg.to_dict()
    config["backbone"] = {**config["backbone"], "weights": None}  # already in the state dict
    clean_metrics = {str(k): float(v) for k, v in metrics.items()}
    spec = {
        "format": FORMAT,
        "model_config": config,
        "categories": cmap.to_dict(),
        "preprocessing": {
            "input": "RGB uint8 [H, W, 3], EXIF orientation applied",
            "resize": resize,
            "boxes": "xyxy in original-image pixels",
        },
        "metrics": clean_metrics,
        "training_config": redact_config(training_config),
    }
    with tempfile.TemporaryDirectory(prefix="dhrcnn-pyfunc-") as tmp, tracking_uri_scope(tracking_uri):
        artifacts = _write_artifacts(Path(tmp), model, spec)
        client = mlflow.MlflowClient()
        active = mlflow.active_run()
        run_id = run_id or (active.info.run_id if active is not None else None)
        if not run_id:
            raise ValueError("log_detector: give run_id (or call it inside an active MLflow run)")
        # The logged model belongs to the run's experiment (MLflow would otherwise pick the global default).
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(ENTRY_FILE),  # model from code: MLflow runs the file, nothing is pickled
            artifacts=artifacts,
            code_paths=[str(Path(tmp) / "code" / p) for p in ("model", "pipeline", "jobs")],
            pip_requirements=pip_requirements(),
            signature=_signature(),
            input_example=_input_example(),
            metadata={"dhrcnn_format": FORMAT, "weights_sha256": spec["weights_sha256"]},
        )
    return info.model_uri


def load_detector(
    model_uri: str, tracking_uri: str | None = None, device: str | None = "cpu"
) -> mlflow.pyfunc.PyFuncModel:
    """Load a pyfunc logged by :func:`log_detector` (``models:/NAME@champion``, ``models:/m-...``, a folder)
    on ``device`` (``None``: the GPU when one is visible). :func:`torch_detector` / :func:`unwrap` give the torch
    module / the :class:`DetectorModel` inside, for in-process use."""
    with tracking_uri_scope(tracking_uri):
        loaded = mlflow.pyfunc.load_model(model_uri)
    if device is not None:
        unwrap(loaded).to(device)
    return loaded


def unwrap(loaded: mlflow.pyfunc.PyFuncModel) -> DetectorModel:
    """The :class:`DetectorModel` inside a loaded pyfunc: ``.detector``, ``.resize``, ``.categories``, ``.spec``."""
    python_model = loaded.unwrap_python_model()
    # by name too: a pyfunc loaded from its own code/ copy holds a class object distinct from this module's
    if not isinstance(python_model, DetectorModel) and type(python_model).__name__ != "DetectorModel":
        raise TypeError(f"not a Double-Head detector pyfunc: {type(python_model).__name__}")
    return python_model


def torch_detector(loaded: mlflow.pyfunc.PyFuncModel) -> torch.nn.Module:
    """The torch detector (eval mode) inside a loaded pyfunc, for in-process use (``unwrap(loaded).predictor``
    runs it on images)."""
    return unwrap(loaded).detector


def predict_images(loaded: mlflow.pyfunc.PyFuncModel, images: Sequence[Any]) -> pd.DataFrame:
    """``loaded.predict`` on a list of base64 strings, bytes or RGB uint8 arrays."""
    return loaded.predict(pd.DataFrame({"image": list(images)}))

"""Inference and scoring: the one :class:`~jobs.evaluate.predictor.Predictor`, COCO metrics, plots and pictures,
``dhrcnn evaluate`` on a model, and batch prediction with Ray Data."""

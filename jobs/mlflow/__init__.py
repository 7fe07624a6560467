"""MLflow, in one direction: where MLflow is (:mod:`jobs.mlflow.uri`) <- the detector's model format
(:mod:`jobs.mlflow.pyfunc_model`) <- the registry <- run tracking. (``import mlflow`` inside these modules is
the MLflow library: imports are absolute.)"""

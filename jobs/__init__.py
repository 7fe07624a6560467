"""Entry points that compose ``pipeline`` and ``model`` on Ray and MLflow."""

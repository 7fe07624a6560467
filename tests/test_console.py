"""What the driver prints (jobs/console.py): progress lines outside a terminal, the evaluation bars, the results
block, Ray's console settings, and pycocotools kept quiet under Ray Train's print. No Ray cluster needed."""

from __future__ import annotations

import builtins
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from jobs.console import PhaseBar, ProgressView, ray_console, results_text
from jobs.evaluate.coco_eval import STAT_NAMES, evaluate_coco


def test_phase_bar_outside_a_terminal_prints_a_line_per_interval_and_one_at_the_end() -> None:
    out = io.StringIO()
    bar = PhaseBar("train", 480, "it", tty=False, every_s=3600, stream=out)
    for n in range(1, 481):
        bar.update_to(n, f"epoch {1 + n // 60}/8, loss 0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 100%") and "480/480" in lines[0]
    assert lines[0].endswith("epoch 9/8, loss 0.5]") and "\r" not in out.getvalue()

    out = io.StringIO()
    bar = PhaseBar("train", 10, "it", tty=False, every_s=0.0, stream=out)
    for n in range(1, 11):
        bar.update_to(n)
    bar.close()
    assert len(out.getvalue().splitlines()) == 11  # every update (interval 0) and the last line


def test_progress_view_sums_the_ranks_of_an_evaluation_and_prints_one_line_for_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    view = ProgressView(eval_images=60, tty=False)
    start = {"phase": "train", "total": 16, "epoch": 1, "epochs": 2}
    view.apply([{**start, "iteration": i, "loss": 2.0 / i} for i in range(1, 9)])
    view.apply([{"phase": "eval", "step": 8, "images": 4} for _ in range(15)])  # two ranks, batches of 4
    view.apply([{"phase": "eval", "step": 8, "images": 0}, {"phase": "eval_done", "step": 8, "AP": 0.25, "AP50": 0.5}])
    view.apply([{**start, "iteration": i, "epoch": 2, "loss": 0.2} for i in range(9, 17)])
    view.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("eval @ iter 8: 100%") and "60/60" in lines[0] and "AP 0.250, AP50 0.500]" in lines[0]
    assert lines[1].startswith("train: 100%") and "16/16" in lines[1] and "epoch 2/2, loss 0.2000]" in lines[1]


def test_results_text_is_the_coco_table_then_the_uris() -> None:
    metrics: dict[str, Any] = {f"val/{name}": i / 100 for i, name in enumerate(STAT_NAMES)}
    metrics |= {"run_uri": "sqlite:///x/mlflow.db run abc", "model_uri": "models:/double-head-frcnn/3", "epoch": 8}
    lines = results_text(metrics, title="box AP (synthetic val): 0.000").splitlines()
    assert lines[0] == "box AP (synthetic val): 0.000" and len(lines) == 15
    assert lines[1] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.000"
    assert lines[12] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = 0.110"
    assert lines[13:] == ["MLflow run:   sqlite:///x/mlflow.db run abc", "model:        models:/double-head-frcnn/3"]
    assert results_text({"run_uri": "r"}, title="t") == "MLflow run:   r"  # no evaluation: no table


@pytest.fixture
def data_context() -> Iterator[Any]:
    """Ray Data's process-wide DataContext, its console settings restored after the test; Ray's loggers too."""
    import ray.data

    context = ray.data.DataContext.get_current()
    fields = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start")
    saved = {name: getattr(context, name) for name in fields}
    loggers = [logging.getLogger(n) for n in ("ray.data", "ray.data._internal.progress", "mlflow.store.db.utils")]
    loggers.append(logging.getLogger("ray._private.authentication.authentication_token_setup"))
    state = [(lg, lg.level, list(lg.filters), [(h, h.level) for h in lg.handlers]) for lg in loggers]
    yield context
    for name, value in saved.items():
        setattr(context, name, value)
    for lg, level, filters, handlers in state:
        lg.setLevel(level)
        lg.filters[:] = filters
        for handler, handler_level in handlers:
            handler.setLevel(handler_level)


def test_ray_console_quiet_by_default_everything_when_verbose(data_context: Any) -> None:
    quiet = ray_console(verbose=False)
    assert quiet.init_kwargs == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert quiet.train_log_level == "WARNING"
    assert not data_context.enable_progress_bars and not data_context.enable_operator_progress_bars
    assert not data_context.print_on_execution_start

    def shown(logger: str, message: str, level: int = logging.WARNING) -> bool:
        record = logging.LogRecord(logger, level, __file__, 1, message, None, None)
        return logging.getLogger(logger).filter(record)

    token = "ray._private.authentication.authentication_token_setup"
    assert not shown(token, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    assert shown(token, "Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert not shown("ray.data._internal.progress", "Progress bars disabled. To enable, set ...")
    assert shown("ray.data._internal.progress", "Progress bars for operators disabled. To enable ...")
    consoles = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
    assert all(h.level == logging.WARNING for h in consoles if isinstance(h, logging.StreamHandler))

    verbose = ray_console(verbose=True)
    assert verbose.init_kwargs["log_to_driver"] and verbose.train_log_level == "INFO"
    assert data_context.enable_progress_bars and data_context.enable_operator_progress_bars


def test_pycocotools_prints_nothing_even_through_ray_trains_print(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's workers replace ``builtins.print`` with one that logs every call (redirect_stdout does not
    reach it); here a recording print stands in for it."""
    printed: list[str] = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    started = time.monotonic()
    metrics = evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}])
    assert metrics.stats["AP"] == pytest.approx(1.0) and time.monotonic() - started < 30
    assert printed == []
    import pycocotools.cocoeval

    assert "print" not in vars(pycocotools.cocoeval)  # the shadow is gone after the call

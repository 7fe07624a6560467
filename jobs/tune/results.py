"""A sweep's trials as rows: sampled values, last metric, epochs run, how the trial ended; the best one; the
results table printed by ``dhrcnn tune`` and logged to the sweep's MLflow run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from jobs.tune.config import SweepConfig

Status = Literal["completed", "stopped early", "error", "unfinished"]
AP = "val/AP"


@dataclass(frozen=True)
class TrialRow:
    """One trial of a sweep.

    Attributes:
        trial_id: Tune's trial id (``<experiment>_<index>``).
        params: the sampled values, by dotted job key.
        value: the sweep's metric (e.g. ``val/AP``) at the trial's last report, ``None`` if never reported.
        epochs: completed epochs.
        status: ``completed`` (all ``train.epochs``), ``stopped early`` (by ASHA), ``error``, or
            ``unfinished`` (the sweep was interrupted; starting it again continues the trial).
        model_uri: the trial's logged (unregistered) model, ``models:/m-...``; only for completed trials.
        run_id: the trial's MLflow run (nested under the sweep's), ``None`` if it never started.
        metrics: the numeric metrics of the last report.
        error: the error of a failed trial.
    """

    trial_id: str
    params: dict[str, Any]
    value: float | None
    epochs: int
    status: Status
    model_uri: str | None
    run_id: str | None
    metrics: dict[str, float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trial_row(result: Any, sweep: SweepConfig, run_id: str | None) -> TrialRow:
    """A :class:`TrialRow` from a Tune ``Result`` (its last metrics, config and error)."""
    metrics: Mapping[str, Any] = result.metrics or {}
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    value = numbers.get(sweep.tune.metric)
    epochs = int(numbers.get("epoch", 0))
    status: Status = "completed" if epochs >= sweep.job.train.epochs else "stopped early"
    if result.error is not None:
        status = "error"
    elif not metrics.get("done", False):  # Tune marks the last result of an ended (or stopped) trial done
        status = "unfinished"
    model_uri = metrics.get("model_uri") if status == "completed" else None
    return TrialRow(
        trial_id=str(metrics.get("trial_id")),
        params={k: result.config[k] for k in sweep.tune.space if k in (result.config or {})},
        value=value if value is not None and math.isfinite(value) else None,
        epochs=epochs,
        status=status,
        model_uri=str(model_uri) if model_uri else None,
        run_id=run_id,
        metrics=numbers,
        error=str(result.error) if result.error is not None else None,
    )


def best_row(rows: Sequence[TrialRow], mode: Literal["max", "min"]) -> TrialRow | None:
    """The completed trial with a logged model and the best value (``mode``); ``None`` if there is none.
    Trials stopped early are not candidates: they have no final model."""
    candidates = [r for r in rows if r.status == "completed" and r.model_uri and r.value is not None]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda r: sign * (r.value or 0.0))


def results_table(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> str:
    """A Markdown table: trial, one column per searched key, val/AP (and the sweep's metric when it is another
    one), epochs run and status."""
    metrics = [AP] if metric == AP else [metric, AP]
    header = ["trial", *keys, *metrics, "epochs", "status"]
    lines = [_line(header), _line(["---"] * len(header))]
    for row in rows:
        values = [_format(row.params.get(k)) for k in keys] + [_format(row.metrics.get(m)) for m in metrics]
        lines.append(_line([row.trial_id, *values, str(row.epochs), row.status]))
    return "\n".join(lines)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""What a job prints on the driver's console: one progress bar per phase and the results; Ray's own output stays
in its log files (``<session dir>/logs``) unless ``--verbose``.

* :func:`ray_console` configures, before ``ray.init`` and before any Dataset exists, what Ray prints on the
  driver and what its workers forward to it (``log_to_driver``), and Ray Data's progress bars (the Dataset's
  ``DataContext`` travels with it to the Ray Train workers' split coordinators).
* :class:`PhaseBar` is one progress bar: tqdm on a terminal; in a pipe, a file or a Ray job's log, a line every
  ``every_s`` seconds and one at the end.
* :func:`follow_progress` draws the training and evaluation bars on the driver from the events the workers post
  to a :class:`jobs.train.progress.ProgressBoard` (the workers may be on other nodes: an actor carries them).
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

from jobs.evaluate.coco_eval import STAT_NAMES, summary_table


@dataclass(frozen=True)
class RayConsole:
    """How much of Ray reaches the console. ``verbose``: everything (worker logs, Ray Data's per-operator
    progress bars, Ray Train's INFO logs); otherwise progress bars and results only."""

    verbose: bool = False

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """``ray.init`` arguments: worker stdout/stderr forwarded to the driver only when verbose."""
        return {"log_to_driver": self.verbose, "logging_level": logging.INFO if self.verbose else logging.WARNING}

    @property
    def train_log_level(self) -> str:
        """Ray Train's ``LoggingConfig.log_level``: its INFO records (worker group started, process group set
        up, checkpoints) go to its system log files only, unless verbose. (Its ``Reporting training result:
        TrainingReport(...)`` lines escape that setting: Ray 2.60 logs them under a logger named after its source
        file. They stay in the worker's log file, which reaches the console only with ``log_to_driver``.)"""
        return "INFO" if self.verbose else "WARNING"


def ray_console(verbose: bool = False) -> RayConsole:
    """Configure this driver's Ray output (call before ``ray.init`` and before creating Datasets)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    # Our phase bars replace Ray Data's; the settings travel with every Dataset created from now on (to the
    # split coordinators of the Ray Train workers too).
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    context.print_on_execution_start = verbose  # "Starting execution of Dataset ..." / "Execution plan ..."
    if not verbose:
        # Ray Data logs every execution's end ("execution finished", "Data sink Parquet finished") at INFO to
        # its file (ray-data.log) and to the console; only the console handler is raised, the file keeps them.
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
        # Ray turns token authentication on for every new local cluster and warns that it did, and how to opt
        # out. Asking for it explicitly (RAY_AUTH_MODE=token) would silence that, but Ray reads the variable
        # when it is imported, before any of our code runs; authentication stays on, only the notice goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _DropMessage("Token authentication is enabled for this Ray cluster")
        )
        # Ray Data warns, at its first execution, that the progress bars turned off above are off.
        logging.getLogger("ray.data._internal.progress").addFilter(_DropMessage("Progress bars disabled."))
        # MLflow announces at INFO that it creates (or upgrades) the schema of a new sqlite store, a one-off
        # with nothing to act on; its warnings still show.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return RayConsole(verbose)


class _DropMessage(logging.Filter):
    """Drops the records of one named logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class PhaseBar:
    """A progress bar: ``update_to(n, postfix)``, ``close(postfix)``. On a terminal (``tty``) a tqdm bar;
    elsewhere a line at most every ``every_s`` seconds and a last one at :meth:`close`. A ``transient`` bar
    (an evaluation during training) shows below the others while it runs and leaves only its last line."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str,
        *,
        tty: bool,
        transient: bool = False,
        initial: int = 0,
        every_s: float = 60.0,
        stream: TextIO | None = None,
    ) -> None:
        self.desc, self.total, self.unit, self.tty, self.transient = desc, total, unit, tty, transient
        self.stream = stream or sys.stderr
        self.n, self.initial, self.every_s = initial, initial, every_s
        self.start = self._printed = time.monotonic()
        self.postfix = ""
        self._bar = None
        if tty:
            self._bar = tqdm(
                desc=desc,
                total=total,
                unit=unit,
                initial=initial,
                file=self.stream,
                position=1 if transient else 0,
                leave=not transient,
                ncols=min(shutil.get_terminal_size().columns, 120),  # 80 where the terminal reports no size
            )

    def update_to(self, n: int, postfix: str = "") -> None:
        self.postfix = postfix or self.postfix
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n - self._bar.n)
        elif not self.transient and time.monotonic() - self._printed >= self.every_s:
            self.n = n
            self._print_line()
        self.n = n

    def close(self, postfix: str = "") -> None:
        self.postfix = postfix or self.postfix
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.close()
            if self.transient:
                tqdm.write(self.line(), file=self.stream)
        else:
            self._print_line()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        return tqdm.format_meter(
            self.n, self.total, elapsed, prefix=self.desc, unit=self.unit, postfix=self.postfix, initial=self.initial
        )

    def _print_line(self) -> None:
        self._printed = time.monotonic()
        print(self.line(), file=self.stream, flush=True)


class ProgressView:
    """Turns :class:`jobs.train.progress.ProgressBoard` events into bars: one for training, one per evaluation."""

    def __init__(self, *, eval_images: int, tty: bool) -> None:
        self.eval_images, self.tty = eval_images, tty
        self.train: PhaseBar | None = None
        self.evals: dict[int, tuple[PhaseBar, int]] = {}  # step -> (bar, images so far)

    def apply(self, events: list[Mapping[str, Any]]) -> None:
        for event in events:
            phase = event["phase"]
            if phase == "train":
                if self.train is None:
                    self.train = PhaseBar("train", event["total"], "it", tty=self.tty, initial=event["iteration"] - 1)
                loss = f"epoch {event['epoch']}/{event['epochs']}, loss {event['loss']:.4f}"
                self.train.update_to(event["iteration"], loss)
            elif phase == "eval":
                bar, seen = self.evals.get(event["step"]) or (self._eval_bar(event["step"]), 0)
                seen += event["images"]
                bar.update_to(seen)
                self.evals[event["step"]] = (bar, seen)
            elif phase == "eval_done":
                bar, _ = self.evals.pop(event["step"], None) or (self._eval_bar(event["step"]), 0)
                bar.close(f"AP {event['AP']:.3f}, AP50 {event['AP50']:.3f}")

    def _eval_bar(self, step: int) -> PhaseBar:
        return PhaseBar(f"eval @ iter {step}", self.eval_images, "img", tty=self.tty, transient=True)

    def close(self) -> None:
        for bar, _ in self.evals.values():
            bar.close()
        if self.train is not None:
            self.train.close()


@contextmanager
def follow_progress(board: Any, *, eval_images: int, tty: bool, poll_s: float = 0.5) -> Iterator[None]:
    """While the block runs (``trainer.fit()``), a thread drains ``board`` (a ``ProgressBoard`` actor) every
    ``poll_s`` and draws the bars; at the end it drains it once more and closes them."""
    import ray

    view = ProgressView(eval_images=eval_images, tty=tty)
    stop = threading.Event()

    def drain() -> bool:
        try:
            view.apply(ray.get(board.take.remote()))
            return True
        except ray.exceptions.RayError:  # the actor is gone (Ray shutting down): stop drawing, never fail
            return False

    def loop() -> None:
        while not stop.wait(poll_s) and drain():
            pass

    thread = threading.Thread(target=loop, name="dhrcnn-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        drain()
        view.close()


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def results_text(metrics: Mapping[str, Any], title: str) -> str:
    """The results block: the 12 COCO box numbers of the last evaluation (as pycocotools prints them) under
    ``title``, then the MLflow run and the registered model."""
    lines = []
    stats = {name: float(metrics[f"val/{name}"]) for name in STAT_NAMES if f"val/{name}" in metrics}
    if len(stats) == len(STAT_NAMES):
        lines += [title, summary_table(stats)]
    if metrics.get("run_uri"):
        lines.append(f"MLflow run:   {metrics['run_uri']}")
    if metrics.get("model_uri"):
        lines.append(f"model:        {metrics['model_uri']}")
    return "\n".join(lines)

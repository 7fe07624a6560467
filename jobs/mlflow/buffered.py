"""Tracking off the critical path: a :class:`~jobs.mlflow.tracking.Tracker` whose metric and artifact logging never
blocks or ends training.

Calls are queued and a background thread sends them, in order. When MLflow does not answer (after the client's
own HTTP retries), the thread says so once, keeps everything queued (metrics in memory, artifacts copied to a
spool directory, so that their source may go away) and tries again with a growing pause; when MLflow answers
again it sends the backlog and says so. :meth:`BufferedTracker.flush` waits for the queue to drain: before the
final model registration (which stays synchronous: a job whose model cannot be registered has failed) and at
the end of the run.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jobs.mlflow.tracking import Tracker
from jobs.redact import redact_url

Item = tuple[str, tuple[Any, ...]]


class BufferedTracker:
    """Wraps ``tracker``: :meth:`start`, :meth:`log_detector` and :meth:`end` run at once (after a :meth:`flush`);
    :meth:`log_metrics`, :meth:`log_artifact` and :meth:`log_text` are queued. ``warn`` prints a line (rank 0's
    console); ``pause_s`` .. ``max_pause_s``: the wait between tries while MLflow does not answer."""

    def __init__(
        self,
        tracker: Tracker,
        *,
        warn: Callable[[str], None] = print,
        pause_s: float = 5.0,
        max_pause_s: float = 60.0,
    ) -> None:
        self.tracker, self.warn, self.pause_s, self.max_pause_s = tracker, warn, pause_s, max_pause_s
        self._queue: collections.deque[Item] = collections.deque()
        self._changed = threading.Condition()
        self._spool: Path | None = None
        self._thread: threading.Thread | None = None
        self._outage_since: float | None = None

    @property
    def enabled(self) -> bool:
        return self.tracker.enabled

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    @property
    def pending(self) -> int:
        """Calls waiting to be sent."""
        with self._changed:
            return len(self._queue)

    def start(self, run_id: str | None = None) -> str | None:
        run = self.tracker.start(run_id)
        if self.enabled and self._thread is None:
            self._spool = Path(tempfile.mkdtemp(prefix="dhrcnn-mlflow-spool-"))
            self._thread = threading.Thread(target=self._send_forever, name="mlflow-logger", daemon=True)
            self._thread.start()
        return run

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._put("log_metrics", ({k: float(v) for k, v in metrics.items()}, int(step)))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        assert self._spool is not None, "start() first"
        source = Path(local_path)
        copy = Path(tempfile.mkdtemp(dir=self._spool)) / source.name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, copy)
        self._put("log_artifact", (str(copy), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put("log_text", (text, artifact_file))

    def log_detector(self, **kwargs: Any) -> tuple[str, str | None] | None:
        """Flush, then log and register the model synchronously (:meth:`Tracker.log_detector`)."""
        self.flush()
        return self.tracker.log_detector(**kwargs)

    def flush(self, timeout_s: float | None = 600.0) -> bool:
        """Wait until every queued call has been sent (at most ``timeout_s``); returns whether it drained."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._queue and self._thread is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.warn(f"MLflow: {len(self._queue)} calls still unsent after {timeout_s:g} s")
                    return False
                self._changed.wait(timeout=left)
        return True

    def end(self, status: str = "FINISHED", timeout_s: float | None = 600.0) -> None:
        """Flush (at most ``timeout_s``), then mark the run ``status``; an MLflow that still does not answer is
        reported, not raised."""
        self.flush(timeout_s)
        try:
            self.tracker.end(status)
        except Exception as err:  # the run's outcome stands; the status can be set later
            self.warn(f"MLflow: could not mark run {self.run_id} {status}: {redact_url(str(err))}")

    def _put(self, method: str, args: tuple[Any, ...]) -> None:
        if not self.enabled:
            return
        with self._changed:
            self._queue.append((method, args))
            self._changed.notify_all()

    def _send_forever(self) -> None:
        pause = self.pause_s
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                method, args = self._queue[0]
            try:
                getattr(self.tracker, method)(*args)
            except Exception as err:  # MLflow unreachable or failing: keep the call, try again later
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    self.warn(
                        f"MLflow does not answer ({type(err).__name__}: {redact_url(str(err)).splitlines()[0][:200]}); "
                        f"training goes on, {self.pending} calls are kept and sent when it answers again"
                    )
                time.sleep(pause)
                pause = min(2 * pause, self.max_pause_s)
                continue
            if method == "log_artifact":
                shutil.rmtree(Path(args[0]).parent, ignore_errors=True)
            with self._changed:
                self._queue.popleft()
                self._changed.notify_all()
            pause = self.pause_s
            if self._outage_since is not None:
                down_s = time.monotonic() - self._outage_since
                self.warn(f"MLflow answers again after {down_s:.0f} s; the kept calls are being sent")
                self._outage_since = None

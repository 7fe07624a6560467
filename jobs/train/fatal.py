"""Errors that a retry cannot fix fail the job once.

Ray Train retries every worker error up to ``run.max_failures`` times from the latest checkpoint; for a killed
worker or a lost node that is right, but a non-finite-loss stop, a class mismatch, a bad config, bad data or a
failed final registration would only fail again after replaying the training since that checkpoint. A worker
that fails with one of :data:`FATAL` records it in the run directory (``fatal_error.json``, with the driver's
attempt id); a worker group restarted within the same attempt finds the record and fails at once with
:class:`FatalError`, so Ray Train's retries end in seconds. Starting the job again (a new attempt, after fixing
the cause) ignores the record.
"""

from __future__ import annotations

import json

from jobs.train.export import ExportError
from jobs.train.optim_step import NonFiniteLossError
from pipeline.storage import StorageConfig, exists, join, read_bytes, write_bytes

# ValueError covers ConfigError, DatasetError and the detector's input checks (e.g. labels beyond num_classes);
# ExportError: the final registration failed after training, the weights are saved and the message says how to
# register them (a retry would train the last epoch again for a registry that is still down)
FATAL: tuple[type[BaseException], ...] = (NonFiniteLossError, ValueError, ExportError)
MARKER = "fatal_error.json"


class FatalError(RuntimeError):
    """An earlier worker group of this attempt failed with an error that a retry cannot fix."""


def record_fatal(run_dir: str, storage: StorageConfig, attempt: str, error: BaseException) -> None:
    """Write the fatal-error record of ``attempt`` into ``run_dir``."""
    record = {"attempt": attempt, "error": f"{type(error).__name__}: {error}"}
    write_bytes(join(run_dir, MARKER), json.dumps(record).encode(), storage)


def refuse_after_fatal(run_dir: str, storage: StorageConfig, attempt: str) -> None:
    """Raise :class:`FatalError` if ``attempt`` already failed with a fatal error in ``run_dir``."""
    marker = join(run_dir, MARKER)
    if not exists(marker, storage):
        return
    record = json.loads(read_bytes(marker, storage))
    if record.get("attempt") == attempt:
        raise FatalError(
            f"not retried: {record.get('error')} (an error that a retry from the last checkpoint cannot fix; "
            "fix its cause and start the job again)"
        )

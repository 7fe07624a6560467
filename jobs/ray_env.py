"""Start or join Ray: the one place every command gets its Ray from (train, tune, evaluate, predict, quickstart)."""

from __future__ import annotations

import os
import time

import ray

from jobs.console import RayConsole


def ensure_ray(num_cpus: int | None = None, *, console: RayConsole | None = None) -> None:
    """Join ``RAY_ADDRESS`` if set (a cluster, or a job submitted to one); else start a local Ray.

    ``console`` (:func:`jobs.console.ray_console`): what Ray prints here; unless verbose, the workers' output
    stays in the session's log files and one line says where. ``None``: Ray's defaults (worker logs forwarded).
    """
    if ray.is_initialized():
        return
    kwargs = console.init_kwargs if console is not None else {"log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(**kwargs)
        where = f"Ray cluster at {context.address_info.get('gcs_address', os.environ['RAY_ADDRESS'])}"
    else:
        # the dashboard serves the State API that Ray Train's placement-group cleaner polls (else it warns)
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, **kwargs)
        if num_cpus != 0:
            _wait_for_available_cpus()
        where = f"local Ray, {ray.cluster_resources().get('CPU', 0):g} CPUs"
    if console is not None and not console.verbose:
        dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
        print(f"{where}{dashboard}; Ray's logs: {context.address_info['session_dir']}/logs", flush=True)


def _wait_for_available_cpus(timeout_s: float = 30.0) -> None:
    """A new local Ray reports its node's resources a moment after ``ray.init`` returns (seconds on a loaded
    machine); a Dataset executed before that sees no available CPU, and Ray Data warns that it will hang."""
    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.1)

"""Checks on the driver before any Train worker starts: what would otherwise fail an epoch later, train nothing,
or hang. Storage and tracking are checked by what precedes them in :func:`jobs.train.job.run_training` (reading
the datasets' manifests, creating the MLflow run, writing ``config.yaml`` beside the run)."""

from __future__ import annotations

from jobs.config import JobConfig
from jobs.datasets import DatasetInfo


class PreflightError(ValueError):
    """The job cannot run as configured; the message names each key and its fix."""


def preflight(
    job: JobConfig, train: DatasetInfo, val: DatasetInfo | None, *, cluster_cpus: float | None, autoscaling: bool
) -> None:
    """Raise :class:`PreflightError` listing every problem: ``model.num_classes`` against the training set's
    categories, the validation set's categories against the training set's, fewer training images than one
    batch per worker, and (unless an autoscaler can add nodes) no CPU left in ``cluster_cpus`` for Ray Data's
    decoding beside the Train workers."""
    problems = []
    found = train.categories.num_classes
    if job.model.num_classes != found:
        names = ", ".join(train.categories.names[:8]) + (", …" if found > 8 else "")
        problems.append(
            f"model.num_classes is {job.model.num_classes} but data.train has {found} categories ({names}): "
            f"set model.num_classes={found}"
        )
    if val is not None and val.categories != train.categories:
        problems.append(
            f"data.val's categories ({val.categories.num_classes}: {', '.join(val.categories.names[:8])}) differ "
            f"from data.train's ({found}): prepare both splits with the same category list (`dhrcnn prepare` "
            "writes one for both)"
        )
    workers, batch = job.scaling.num_workers, job.data.batch_size
    if train.num_images < workers * batch:
        problems.append(
            f"data.train has {train.num_images} images, fewer than scaling.num_workers x data.batch_size = "
            f"{workers} x {batch}: no worker would take a single step; lower data.batch_size or scaling.num_workers"
        )
    if cluster_cpus is not None and not autoscaling:
        taken = workers * job.scaling.cpus_per_worker
        if cluster_cpus - taken < 1:
            problems.append(
                f"the Ray cluster has {cluster_cpus:g} CPUs and the {workers} Train workers take {taken:g} "
                "(scaling.num_workers x scaling.cpus_per_worker): none is left for Ray Data's decoding, and the "
                "run would wait forever; lower scaling.cpus_per_worker or add CPUs"
            )
    if problems:
        raise PreflightError("the job cannot start:\n  - " + "\n  - ".join(problems))


def cluster_capacity() -> tuple[float | None, bool]:
    """``(CPUs of the connected Ray cluster, whether an autoscaler can add nodes)``; the CPUs are ``None`` when
    Ray cannot tell (then nothing is checked)."""
    import ray

    try:
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
    except Exception:  # not connected: nothing to check against
        return None, False
    try:  # Ray Data's own test (a private API): is any node type of the cluster allowed to grow?
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        return cpus, is_autoscaling_enabled()
    except Exception:  # cannot tell: do not refuse a cluster that may grow
        return cpus, True

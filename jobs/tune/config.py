"""The ``tune:`` section of a job YAML: a Ray Tune sweep over the training job, typed and validated at load.

A sweep file is a job config (model, data, train, scaling, tracking, run) plus::

    tune:
      num_samples: 4
      max_concurrent_trials: 1
      metric: val/AP
      mode: max
      scheduler: {grace_period: 1, reduction_factor: 2}     # ASHA on `epoch`
      space:
        train.base_lr: {loguniform: [0.01, 0.1]}
        train.weight_decay: {choice: [0.0001, 0.0005]}
        model.roi_head.reg_roi_scale_factor: {uniform: [1.1, 1.5]}

The keys of ``space`` are dotted job-config keys. Each is checked at load by resolving the job with the
distribution's extreme values (both ends of a range, every listed value), so a wrong key or a value the job
rejects raises a :class:`ConfigError` that names ``tune.space.<key>``. ``run.name`` is the sweep's name and
``run.storage_path`` its storage; ``tracking.registered_model_name`` receives the best trial's model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from jobs.config import JobConfig, resolve_job_config
from model.typed_config import ConfigError, from_mapping, load_yaml, merge, parse_dotted, to_dict

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
# Set by the sweep itself (per trial), or sized by it: not searchable.
FIXED_SECTIONS = ("run", "tracking", "scaling")
FIXED_KEYS = ("train.epochs", "train.eval_every_epochs")


@dataclass(frozen=True)
class Distribution:
    """One dimension of the search space: exactly one of

    - ``uniform: [low, high]`` and ``loguniform: [low, high]`` (``low > 0``): floats;
    - ``randint: [low, high]``: integers, both ends included;
    - ``choice: [v1, v2, ...]``: one value drawn per trial;
    - ``grid: [v1, v2, ...]``: every value, each ``num_samples`` times (Tune's grid search).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: tuple[Any, ...] | None = None
    grid: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {', '.join(DISTRIBUTIONS)}, got {given or 'none'}")
        args = self.args
        if self.kind in ("choice", "grid") and not args:
            raise ValueError(f"{self.kind}: expected at least one value")
        if self.kind in ("uniform", "loguniform", "randint") and not args[0] < args[1]:
            raise ValueError(f"{self.kind}: expected low < high, got {list(args)}")
        if self.kind in ("uniform", "loguniform") and not all(math.isfinite(v) for v in args):
            raise ValueError(f"{self.kind}: expected finite bounds, got {list(args)}")
        if self.kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: expected low > 0, got {args[0]}")

    @property
    def kind(self) -> str:
        """``uniform``, ``loguniform``, ``randint``, ``choice`` or ``grid``."""
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def args(self) -> tuple[Any, ...]:
        return getattr(self, self.kind)

    def probe_values(self) -> tuple[Any, ...]:
        """Values a trial may get that, if the job accepts them, make every sample acceptable: both ends of a
        range (the job's checks are bounds), every value of a list."""
        return tuple(self.args)


@dataclass(frozen=True)
class AshaConfig:
    """ASHA early stopping (Ray Tune's ``ASHAScheduler``) on ``epoch``, the completed epochs reported with
    each evaluation: at epochs ``grace_period x reduction_factor^k`` (up to ``train.epochs``) a trial whose
    metric is below the ``1 - 1/reduction_factor`` quantile of the values recorded there so far is stopped."""

    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ValueError(f"grace_period: expected >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor: expected > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class TuneConfig:
    """A sweep: ``num_samples`` trials (times the size of any ``grid``), at most ``max_concurrent_trials``
    at a time, ranked by ``metric`` (``mode``), stopped early by ASHA.

    Attributes:
        space: dotted job-config key -> :class:`Distribution`.
        metric: a key of every report of the training loop: ``val/AP`` (always there), or e.g. ``train/loss``
            (``mode: min``; there once logged, i.e. when ``train.log_every_iters`` iterations precede the first
            report) or ``val/AP50`` (there once evaluated, i.e. with no checkpoint report before the first
            evaluation). Tune fails the sweep on a report without it.
        trial_cpus: CPUs reserved for each trial's driver (the function that builds and fits the
            ``TorchTrainer``; its workers reserve their own ``scaling`` resources).
        seed: seed of the random search (``None``: a different draw every sweep).
    """

    space: dict[str, Distribution]
    num_samples: int = 4
    max_concurrent_trials: int = 1
    metric: str = "val/AP"
    mode: Literal["max", "min"] = "max"
    scheduler: AshaConfig = field(default_factory=AshaConfig)
    trial_cpus: float = 0.25
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials: expected >= 1")
        if not self.space:
            raise ValueError("space: expected at least one key to search")
        if self.trial_cpus <= 0:
            raise ValueError(f"trial_cpus: expected > 0, got {self.trial_cpus}")

    def to_dict(self) -> dict[str, Any]:
        """Plain form (YAML, MLflow params): each distribution as ``{kind: [values]}``."""
        return {**to_dict(self), "space": {k: {d.kind: to_dict(list(d.args))} for k, d in self.space.items()}}


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep file: the base ``job`` every trial starts from and its ``tune`` section."""

    job: JobConfig
    tune: TuneConfig


def resolve_sweep_config(raw: Mapping[str, Any], overrides: list[str] | None = None) -> SweepConfig:
    """Build a :class:`SweepConfig` from a job mapping with a ``tune`` section (plus ``key=value`` overrides,
    ``tune.*`` ones included). Raises :class:`ConfigError` naming the key on any error."""
    raw = merge(raw, parse_dotted(overrides or []))
    if "tune" not in raw:
        raise ConfigError("missing required key tune (the sweep: num_samples, scheduler, space, ...)")
    job_raw = {k: v for k, v in raw.items() if k != "tune"}
    job = resolve_job_config(job_raw)
    tune_raw = raw["tune"]
    if isinstance(tune_raw, Mapping) and "space" in tune_raw:
        tune_raw = {**tune_raw, "space": flat_space(tune_raw["space"])}
    tune = from_mapping(TuneConfig, tune_raw, "tune")
    for key, distribution in tune.space.items():
        check_key(job, key, distribution)
    if tune.scheduler.grace_period > job.train.epochs:
        raise ConfigError(
            f"tune.scheduler.grace_period: {tune.scheduler.grace_period} is beyond train.epochs "
            f"({job.train.epochs}); no trial could be stopped early"
        )
    return SweepConfig(job, tune)


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """:func:`resolve_sweep_config` of a YAML file."""
    return resolve_sweep_config(load_yaml(path), overrides)


def flat_space(space: Any, prefix: str = "") -> dict[str, Any]:
    """``space`` with nested sections flattened to dotted keys: ``{train: {base_lr: {uniform: [..]}}}`` (what
    ``tune.space.train.base_lr.uniform=[..]`` overrides give) is ``{"train.base_lr": {uniform: [..]}}``."""
    where = f"tune.space.{prefix}".rstrip(".")
    if not isinstance(space, Mapping):
        raise ConfigError(f"{where}: expected a mapping of dotted job keys to distributions, got {space!r}")
    flat: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not set(value) & set(DISTRIBUTIONS):
            flat.update(flat_space(value, f"{name}."))
        elif not isinstance(value, Mapping):
            raise ConfigError(
                f"tune.space.{name}: expected a distribution {{KIND: VALUES}} with KIND one of "
                f"{', '.join(DISTRIBUTIONS)}, got {value!r}"
            )
        else:
            flat[name] = value
    return flat


def check_key(job: JobConfig, key: str, distribution: Distribution) -> None:
    """Raise :class:`ConfigError` naming ``tune.space.<key>`` unless ``key`` is a searchable job key that
    accepts each of the distribution's :meth:`~Distribution.probe_values`."""
    where = f"tune.space.{key}"
    if key.split(".", 1)[0] in FIXED_SECTIONS or key in FIXED_KEYS:
        raise ConfigError(
            f"{where}: not searchable (the sweep sets {', '.join(s + '.*' for s in FIXED_SECTIONS)} per trial "
            f"and {', '.join(FIXED_KEYS)} from the job); search model.*, data.* or train.* keys"
        )
    for value in distribution.probe_values():
        try:
            with_values(job, {key: value})
        except ConfigError as err:
            raise ConfigError(f"{where}: {distribution.kind} value {value!r} is rejected: {err}") from err


def with_values(job: JobConfig, values: Mapping[str, Any]) -> JobConfig:
    """``job`` with dotted keys set (``{"train.base_lr": 0.05}``), validated again as a whole; explicit
    storage credentials are kept (the plain-dict form drops them)."""
    raw: dict[str, Any] = job.to_dict()
    for key, value in values.items():
        raw = set_dotted(raw, key, value)
    resolved = resolve_job_config(raw)
    return replace(resolved, data=replace(resolved.data, storage=job.data.storage))


def set_dotted(raw: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of nested mapping ``raw`` with ``a.b.c`` set to ``value`` (missing sections created)."""
    head, _, rest = key.partition(".")
    if not head:
        raise ConfigError(f"{key!r}: expected a dotted config key such as train.base_lr")
    out = dict(raw)
    if not rest:
        out[head] = value
        return out
    section = out.get(head, {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key}: {head} is a value ({section!r}), not a section")
    out[head] = set_dotted(section, rest, value)
    return out


def trial_job(sweep: SweepConfig, params: Mapping[str, Any], name: str, storage_path: str) -> JobConfig:
    """The job of one trial: the base job with the sampled ``params``, its own Train run ``name`` under
    ``storage_path``, an evaluation every epoch (ASHA compares trials there), and no registration (the sweep
    registers its best model)."""
    job = with_values(sweep.job, params)
    return replace(
        job,
        train=replace(job.train, eval_every_epochs=1),
        tracking=replace(job.tracking, registered_model_name=None, run_name=None),
        run=replace(job.run, name=name, storage_path=storage_path),
    )

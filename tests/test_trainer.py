"""The trainer and its optimizer step without Ray: hook order, the non-finite policy, clipping, and a resume from
``state_dict`` that continues bit-exactly. A toy regression model keeps them fast; the Ray Train job that
composes them with the detector is tested in ``test_train_job.py``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jobs.train.hooks import Hook
from jobs.train.optim_step import NonFiniteLossError, OptimizerStep, running_stats
from jobs.train.trainer import Trainer
from tests.train_hooks import NonFiniteImages

ITERS = 3


class Toy(nn.Module):
    """``(images, targets) -> predictions``: one linear layer over each image's mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, images, targets):
        features = torch.stack([img.float().mean(dim=(1, 2)) for img in images])
        return self.linear(features), torch.stack([t["boxes"][0] for t in targets])


def criterion(outputs):
    predicted, boxes = outputs
    return {"loss_box": (predicted - boxes / 100).pow(2).mean(), "loss_l1": (predicted - boxes / 100).abs().mean()}


def data(epoch: int):
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(ITERS + 1):  # one batch beyond the epoch's share: consumed, unused
        images = [torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8, generator=generator) for _ in range(2)]
        boxes = [torch.rand(1, 4, generator=generator) * 100 for _ in range(2)]
        yield images, [{"boxes": b, "labels": torch.ones(1, dtype=torch.int64)} for b in boxes]


def make_trainer(hooks=(), *, epochs: int = 2, clip_norm=None, max_consecutive: int = 3) -> Trainer:
    torch.manual_seed(0)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = OptimizerStep(
        list(model.parameters()), optimizer, scheduler, scaler, clip_norm=clip_norm, max_consecutive=max_consecutive
    )
    return Trainer(
        model, model, criterion, step, data, hooks, epochs=epochs, iters_per_epoch=ITERS, device=torch.device("cpu")
    )


class Calls(Hook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name):
        if name in ("before_train", "before_epoch", "before_step", "after_step", "after_epoch", "after_train"):
            return lambda trainer: self.calls.append(f"{name}:{trainer.progress.iteration}")
        return super().__getattribute__(name)


class Counter(Hook):
    """A hook with state: steps seen, saved in checkpoints."""

    def __init__(self) -> None:
        self.steps = 0

    def after_step(self, trainer) -> None:
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state) -> None:
        self.steps = state["steps"]


def test_hooks_are_called_in_order_around_every_step():
    calls = Calls()
    make_trainer([calls], epochs=1).train()
    expected = ["before_train:0", "before_epoch:0"]
    for i in range(ITERS):
        expected += [f"before_step:{i}", f"after_step:{i + 1}"]
    assert calls.calls == [*expected, f"after_epoch:{ITERS}", f"after_train:{ITERS}"]


def test_resume_from_state_dict_continues_bit_exactly():
    uninterrupted = make_trainer([Counter()])
    uninterrupted.train()

    class StopAfter(Hook):
        def after_step(self, trainer) -> None:
            if trainer.progress.iteration == 4:  # mid-epoch 2
                raise KeyboardInterrupt

    first = make_trainer([Counter(), StopAfter()])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    state = first.state_dict()
    assert state["progress"] == {"epoch": 1, "iteration": 4, "batch_in_epoch": 1}
    assert state["hooks"] == {"Counter": {"steps": 4}}

    resumed = make_trainer([Counter()])
    resumed.load_state_dict(state)
    assert resumed.resumed
    resumed.train()
    assert resumed.progress == uninterrupted.progress
    assert resumed.hooks[0].steps == uninterrupted.hooks[0].steps == 2 * ITERS
    for a, b in zip(resumed.module.state_dict().values(), uninterrupted.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optim_step.lr == uninterrupted.optim_step.lr


def test_non_finite_steps_are_skipped_then_stop_the_run():
    trainer = make_trainer([NonFiniteImages((1,))], epochs=1)
    before = None

    class Snapshot(Hook):
        def before_step(self, trainer) -> None:
            nonlocal before
            if trainer.progress.iteration == 1:
                before = [p.detach().clone() for p in trainer.module.parameters()]

        def after_step(self, trainer) -> None:
            if trainer.progress.iteration == 2:
                assert not trainer.stepped and not math.isfinite(float(trainer.loss.detach()))
                after = list(trainer.module.parameters())
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
                    "a skipped step moved weights"
                )

    trainer.hooks.append(Snapshot())
    trainer.train()
    assert trainer.optim_step.skipped == 1 and trainer.optim_step.consecutive == 0
    assert trainer.optim_step.scheduler.last_epoch == ITERS, "the LR schedule advances on skipped steps too"

    stopping = make_trainer([NonFiniteImages((0, 1))], epochs=1, max_consecutive=2)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        stopping.train()


def test_an_infinite_gradient_with_a_finite_loss_is_not_stepped():
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = OptimizerStep([weight], optimizer, scheduler, scaler, clip_norm=None, max_consecutive=5)
    x = torch.tensor([1e20])
    loss = ((weight * x) * x).sum()  # 0, but d loss / d weight = 1e40: infinite in float32
    assert float(loss.detach()) == 0.0
    assert not step.step(loss)
    assert float(weight) == 0.0 and step.skipped == 1 and weight.grad is None


def test_clipping_bounds_the_update_and_state_round_trips():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = OptimizerStep(list(model.parameters()), optimizer, scheduler, scaler, clip_norm=0.5, max_consecutive=5)
    assert step.step(model(torch.tensor([[30.0, 40.0]])).sum())  # gradient (30, 40): norm 50, clipped to 0.5
    assert torch.allclose(model.weight, torch.tensor([[-0.3, -0.4]]))
    state = step.state_dict()
    other = OptimizerStep(list(model.parameters()), optimizer, scheduler, scaler, clip_norm=0.5, max_consecutive=5)
    other.load_state_dict({**state, "skipped": 3, "consecutive": 1})
    assert (other.skipped, other.consecutive) == (3, 1)


def test_a_skipped_step_puts_the_batchnorm_statistics_back():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    buffers = running_stats(model)
    assert len(buffers) == 3  # running_mean, running_var, num_batches_tracked
    step = OptimizerStep(
        list(model.parameters()), optimizer, scheduler, scaler, clip_norm=None, max_consecutive=5, buffers=buffers
    )
    step.begin()
    assert step.step(model(torch.randn(4, 2)).pow(2).sum())
    good = [b.clone() for b in buffers]
    step.begin()
    assert not step.step(model(torch.full((4, 2), float("nan"))).sum())
    assert all(torch.equal(a, b) for a, b in zip(buffers, good, strict=True)), "NaN statistics were kept"


def test_a_fatal_error_is_refused_for_the_rest_of_its_attempt(tmp_path):
    from jobs.train.fatal import FATAL, FatalError, record_fatal, refuse_after_fatal
    from pipeline.storage import StorageConfig

    run_dir, storage = str(tmp_path / "run"), StorageConfig()
    refuse_after_fatal(run_dir, storage, "a1")  # nothing recorded yet
    error = NonFiniteLossError("2 consecutive steps with a non-finite loss or gradient norm; stopping")
    assert isinstance(error, FATAL) and not isinstance(OSError("network"), FATAL)
    record_fatal(run_dir, storage, "a1", error)
    with pytest.raises(FatalError, match=r"not retried: NonFiniteLossError: 2 consecutive steps.*start the job again"):
        refuse_after_fatal(run_dir, storage, "a1")
    refuse_after_fatal(run_dir, storage, "a2")  # the job started again: a new attempt goes ahead


def _rng_worker(rank: int, path: str, init_file: str) -> None:
    """One of two gloo ranks: each draws from its own torch stream, checkpoints every rank's RNG through rank 0,
    draws on, then restores from the file: its next draw must repeat the one after the checkpoint."""
    import torch.distributed as dist

    from jobs.train.trainer import gather_rng_states

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    trainer = make_trainer()
    torch.manual_seed(100 + rank)
    torch.rand(3)
    rngs = gather_rng_states()  # every rank calls it, as the Checkpointer does
    if rank == 0:
        torch.save(trainer.state_dict(rngs), path)
    expected = torch.rand(5)
    torch.rand(7)  # drawn on, as a run that later fails
    dist.barrier()
    trainer.load_state_dict(torch.load(path, weights_only=True))
    assert trainer.rng_restored
    torch.save(torch.stack([expected, torch.rand(5)]), f"{path}.{rank}")
    dist.destroy_process_group()


def test_every_rank_resumes_its_own_random_stream(tmp_path):
    path = str(tmp_path / "state.pt")
    torch.multiprocessing.spawn(_rng_worker, args=(path, str(tmp_path / "init")), nprocs=2)
    draws = [torch.load(f"{path}.{rank}", weights_only=True) for rank in (0, 1)]
    for rank, (expected, resumed) in enumerate(draws):
        assert torch.equal(expected, resumed), f"rank {rank} did not get its own RNG back"
    assert not torch.equal(draws[0][0], draws[1][0]), "the ranks draw from different streams"
    state = torch.load(path, weights_only=True)
    assert len(state["rng"]) == 2
    single = make_trainer()
    single.load_state_dict({**state, "rng": state["rng"][:1]})
    assert single.rng_restored  # rank 0 of a single process
    assert len(make_trainer().state_dict()["rng"]) == 1


def test_a_resume_with_another_layout_rescales_the_lr_at_the_same_point_of_the_epoch():
    from jobs.config import TrainConfig
    from jobs.train.rescale import rescaled
    from jobs.train.schedule import build_optimizer, lr_factor, scaled_lr

    cfg = TrainConfig(epochs=4, base_lr=0.02, base_batch_size=16, warmup_iters=2, steps=(2,))
    old, new = (
        {"world_size": 2, "batch_size": 2, "iters_per_epoch": 6},
        {"world_size": 4, "batch_size": 2, "iters_per_epoch": 3},
    )

    def optim_step(total: int, iters: int) -> OptimizerStep:
        model = nn.Linear(2, 1)
        optimizer, scheduler = build_optimizer(model, cfg, total, iters)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        return OptimizerStep(list(model.parameters()), optimizer, scheduler, scaler, clip_norm=None, max_consecutive=3)

    before = optim_step(4, 6)
    for _ in range(10):  # epoch 1, batch 4 of 6
        before.begin()
        before.step(before.params[0].sum() ** 2)
    state = {"progress": {"epoch": 1, "iteration": 10, "batch_in_epoch": 4}, "optim_step": before.state_dict()}
    moved = rescaled(state, old, new, cfg)
    assert moved["progress"] == {"epoch": 1, "iteration": 5, "batch_in_epoch": 2}  # 4/6 of epoch 1 -> 2/3
    assert state["progress"]["iteration"] == 10, "the checkpoint's state is left as it was"
    epoch_end = rescaled({**state, "progress": {"epoch": 0, "iteration": 6, "batch_in_epoch": 6}}, old, new, cfg)
    assert epoch_end["progress"] == {"epoch": 0, "iteration": 3, "batch_in_epoch": 3}, "no step of it again"
    after = optim_step(8, 3)
    after.load_state_dict(moved["optim_step"])
    assert after.lr == pytest.approx(scaled_lr(cfg, 8) * lr_factor(5, cfg, 3))
    after.begin()
    after.step(after.params[0].sum() ** 2)
    assert after.lr == pytest.approx(scaled_lr(cfg, 8) * lr_factor(6, cfg, 3)) == pytest.approx(0.01 * 0.1)


def test_a_checkpoint_of_another_layout_is_refused_unless_the_job_asks_for_the_rescale():
    from jobs.config import resolve_job_config
    from jobs.train.loop import resumable

    raw = {"model": {"preset": "tiny", "num_classes": 3}, "data": {"train": {"parquet": "/d"}}}
    job = resolve_job_config(raw)
    old, new = (
        {"world_size": 2, "batch_size": 2, "iters_per_epoch": 6},
        {"world_size": 1, "batch_size": 2, "iters_per_epoch": 12},
    )
    state = {"layout": old, "progress": {"epoch": 0, "iteration": 3, "batch_in_epoch": 3}}
    assert resumable(state, old, job, rank=0) is state
    legacy = {k: v for k, v in state.items() if k != "layout"}  # a checkpoint from before layouts were saved
    assert resumable(legacy, new, job, rank=0) is legacy
    with pytest.raises(ValueError, match=r"run.resume_rescale=true"):
        resumable(state, new, job, rank=0)
    allowed = resolve_job_config({**raw, "run": {"resume_rescale": True}})
    with pytest.raises(ValueError, match=r"does not record the workers and batch size"):
        resumable(legacy, new, allowed, rank=0)
    assert resumable({**state, "optim_step": make_trainer().optim_step.state_dict()}, new, allowed, rank=1)[
        "progress"
    ] == {"epoch": 0, "iteration": 6, "batch_in_epoch": 6}

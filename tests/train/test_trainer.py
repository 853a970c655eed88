"""The train/ package's seam: the trainer driving a task it does not
know (a tiny fake task on a fake loader): steps with accumulation, checkpoints kept as configured, exact resume,
the config-diff warning, a finished run left alone."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import radstream.train.trainer as trainer
from radstream.train.config import CheckpointConfig, RunConfig
from radstream.train.optim import Schedule, optimizer_steps
from radstream.train.run_layout import list_checkpoints
from radstream.train.steps import StepStats, accumulate_step, split_sums
from tests.accelerate_state import reset_accelerate

# ---------------------------------------------------------------------------------- the trainer's seam


class FakeLoader:
    """``batches`` batches of 2 samples an epoch, a pure function of (split, epoch, index); resumable."""

    mean_batch_size = 2.0
    mean_step_tokens = 2.0 * 196

    def __init__(self, split: str, batches: int = 6) -> None:
        self.split, self.batches, self.epoch, self.position = split, batches, 0, 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    @property
    def batches_left(self) -> int:
        return self.batches - self.position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while self.position < self.batches:
            seed = ("train", "val", "test").index(self.split) * 10_000 + self.epoch * 100 + self.position
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
            keys = [f"{self.split}-{seed}-{i}" for i in (0, 1)]
            self.position += 1
            yield {"x": x, "y": x.sum(dim=1, keepdim=True), "key": keys}
        self.epoch, self.position = self.epoch + 1, 0  # a full pass moves on, as ShardLoader does

    def close(self) -> None:
        pass


def sum_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared errors of a batch summed, and their count (what ``accumulate_step`` wants)."""
    return F.mse_loss(model(batch["x"]), batch["y"], reduction="sum"), torch.tensor(float(len(batch["x"])))


def test_two_unequal_micro_batches_step_as_one_batch_of_both() -> None:
    """Accumulation normalises by the step's count over its micro-batches: 2 + 6 samples accumulated give
    the update of one batch of the 8 (a mean of the two micro-batch means would weigh the 2 three times)."""
    from accelerate import Accelerator

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=gen)
    both = {"x": x, "y": x.sum(dim=1, keepdim=True) + torch.randn(8, 1, generator=gen)}
    parts = [{k: v[:2] for k, v in both.items()}, {k: v[2:] for k, v in both.items()}]
    weights = []
    for batches in ([both], parts):
        reset_accelerate()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=len(batches))
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        loss, _ = accumulate_step(accelerator, model, optimizer, batches, lambda _, b, m=model: sum_loss(m, b),
                                  step=0, grad_clip=None)  # fmt: skip
        weights.append((torch.cat([p.detach().flatten() for p in model.parameters()]), float(loss)))
    reset_accelerate()
    torch.testing.assert_close(weights[1][0], weights[0][0], rtol=1e-6, atol=1e-7)
    assert weights[1][1] == pytest.approx(weights[0][1], rel=1e-6)


def test_every_evaluation_is_one_skeleton_eval_mode_epoch_zero_its_mode_back() -> None:
    """``split_sums``: the split from epoch 0, the model in eval mode and without gradients while it runs,
    its own mode back after (also when a batch fails), the per-batch sums added up in the asked dtype."""
    from accelerate import Accelerator

    class Split(list):
        epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Dropout(0.5).train()
    seen = []

    def sums(batch: dict) -> torch.Tensor:
        out = model(batch["x"])  # dropout would zero some in train mode
        seen.append((model.training, torch.is_grad_enabled()))
        return torch.stack([out.sum(), torch.tensor(float(len(out)))]).long()

    split = Split([{"x": torch.ones(3)}, {"x": torch.ones(5)}])
    total = split_sums(accelerator, model, split, sums, 2, dtype=torch.long)
    assert total.tolist() == [8, 8] and total.dtype == torch.long
    assert seen == [(False, False)] * 2 and split.epochs == [0] and model.training

    def broken(batch: dict) -> torch.Tensor:
        raise RuntimeError("a bad batch")

    with pytest.raises(RuntimeError, match="a bad batch"):
        split_sums(accelerator, model, split, broken, 2)
    assert model.training
    reset_accelerate()


@dataclass(frozen=True)
class FakeOptim:
    lr: float = 0.05
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 2


@dataclass(frozen=True)
class FakeConfig:
    run_dir: str
    shards: str = "unused"
    loader: dict = field(default_factory=dict)
    optim: FakeOptim = field(default_factory=FakeOptim)
    run: RunConfig = field(
        default_factory=lambda: RunConfig(epochs=2, cpu=True, log_every=1, tensorboard=False)
    )
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=0, keep_last=1))


class FakeTask(trainer.TrainTask):
    """Linear regression of the sum of 4 inputs: the smallest task the trainer can run."""

    results_name = "fake.json"

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 1)

    def schedule(self, loader_batches: int, num_processes: int) -> Schedule:
        spe = optimizer_steps(loader_batches, self.cfg.optim.grad_accum_steps)
        return Schedule(4, self.cfg.optim.lr, spe, spe * self.cfg.run.epochs, warmup_steps=1)

    def step(self, s: trainer.Session, batches: list[dict]) -> StepStats:
        stats = StepStats(loss=torch.zeros(()), images=2 * len(batches))
        stats.loss, stats.grad_norm = accumulate_step(
            s.accelerator, s.model, s.optimizer, batches, lambda _, b: sum_loss(s.model, b),
            step=s.state.step, grad_clip=self.cfg.optim.grad_clip,
        )  # fmt: skip
        return stats

    def _loss(self, s: trainer.Session, loader) -> float:
        with torch.no_grad():
            loader.set_epoch(0)
            return sum(float(F.mse_loss(s.model(b["x"]), b["y"])) for b in loader)

    def validate(self, s: trainer.Session) -> trainer.Validation:
        loss = self._loss(s, s.val_loader)
        return trainer.Validation("loss", loss, lower_is_better=True, metrics={"loss": loss})

    def test(self, s, loader, reason: str, weights: str) -> tuple[dict, dict]:
        loss = self._loss(s, loader)
        return {"loss": loss}, {
            "steps": s.state.step,
            "stopped": reason,
            "weights": weights,
            "test_loss": loss,
        }


@pytest.fixture()
def fake_loaders(monkeypatch):
    monkeypatch.setattr(trainer, "build_loader", lambda cfg, root, split, **kw: FakeLoader(split))
    yield
    reset_accelerate()


def train_lines(run_dir: Path, split: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def test_a_task_the_trainer_does_not_know_trains_checkpoints_and_resumes_exactly(
    tmp_path: Path, fake_loaders, caplog: pytest.LogCaptureFixture
) -> None:
    reference = FakeConfig(run_dir=str(tmp_path / "reference"))
    assert trainer.run(FakeTask(reference)) == 0
    reset_accelerate()
    ref = train_lines(Path(reference.run_dir))
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]  # 6 batches, 2 accumulated a step: 3 steps an epoch, 2 epochs
    assert all(r["images_per_s"] > 0 and "grad_norm" in r for r in ref.values())

    run_dir = tmp_path / "run"
    stopped = replace(reference, run_dir=str(run_dir), run=replace(reference.run, max_steps=2))
    assert trainer.run(FakeTask(stopped)) == 0  # mid-epoch 0
    assert json.loads((run_dir / "fake.json").read_text())["stopped"] == "max_steps"
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="radstream.train.trainer"):
        assert trainer.run(FakeTask(replace(reference, run_dir=str(run_dir)))) == 0
    assert "differs from the checkpoint's" in caplog.text  # run.max_steps changed
    got = train_lines(run_dir)
    assert sorted(got) == sorted(ref)
    for step, row in ref.items():
        assert got[step]["loss"] == pytest.approx(row["loss"], abs=1e-6), step
    results, ref_results = (
        json.loads((Path(d) / "fake.json").read_text()) for d in (run_dir, reference.run_dir)
    )
    assert results["steps"] == 6 and results["test_loss"] == pytest.approx(ref_results["test_loss"], abs=1e-6)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-6"]  # checkpoint.keep_last=1
    assert (run_dir / "best" / "model.safetensors").is_file()
    assert [r["epoch"] for r in train_lines(run_dir, "val").values()] == [0, 1]

    reset_accelerate()
    mtime = (run_dir / "fake.json").stat().st_mtime_ns
    assert trainer.run(FakeTask(replace(reference, run_dir=str(run_dir)))) == 0  # finished: nothing to do
    assert (run_dir / "fake.json").stat().st_mtime_ns == mtime


class PeakAtFirstEpoch(FakeTask):
    """Validation is best after the first epoch and worse after every later one."""

    def validate(self, s: trainer.Session) -> trainer.Validation:
        loss = float(s.state.epoch)
        return trainer.Validation("loss", loss, lower_is_better=True, metrics={"loss": loss})


def test_early_stopping_never_ends_a_run_before_its_minimum_steps(tmp_path: Path, fake_loaders) -> None:
    """3 steps an epoch, validation peaks at epoch 0, patience 1: stopped at step 6 without a minimum; with
    min_steps=10 the epochs are raised to 4 (12 steps) and it trains past step 10."""
    base = FakeConfig(run_dir=str(tmp_path / "short"))
    one_epoch = replace(base.run, epochs=10, patience=1)
    assert trainer.run(PeakAtFirstEpoch(replace(base, run=one_epoch))) == 0
    short = json.loads((tmp_path / "short" / "fake.json").read_text())
    assert (short["steps"], short["stopped"]) == (6, "early_stop")
    reset_accelerate()
    held = replace(base, run_dir=str(tmp_path / "held"), run=replace(one_epoch, epochs=1, min_steps=10))
    assert trainer.run(PeakAtFirstEpoch(held)) == 0
    results = json.loads((tmp_path / "held" / "fake.json").read_text())
    assert results["steps"] == 12 and results["stopped"] in ("early_stop", "done")
    assert "epochs: 4" in (tmp_path / "held" / "config.yaml").read_text()


def test_a_deterministic_run_turns_on_torchs_deterministic_algorithms(tmp_path: Path, fake_loaders) -> None:
    seen = []

    class Record(FakeTask):
        def step(self, s, batches):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().step(s, batches)

    cfg = FakeConfig(run_dir=str(tmp_path / "run"))
    try:
        assert trainer.run(Record(replace(cfg, run=replace(cfg.run, epochs=1, deterministic=True)))) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen and all(seen)


def test_validation_every_n_steps_at_epoch_ends_and_always_at_the_last(tmp_path: Path, fake_loaders) -> None:
    """3 steps an epoch, 6 epochs, run.val_every_steps=5: validations (and the epoch checkpoints) at the ends
    of epochs 1, 3 and 5 (steps 6, 12, 18), not after every epoch; a run stopped between validations resumes
    to the same losses and validations."""
    base = FakeConfig(run_dir=str(tmp_path / "reference"),
                      checkpoint=CheckpointConfig(every_steps=0, keep_last=10))  # fmt: skip
    run = replace(base.run, epochs=6, patience=0, val_every_steps=5)
    assert trainer.run(FakeTask(replace(base, run=run))) == 0
    reference = Path(base.run_dir)
    validations = [(r["epoch"], step) for step, r in train_lines(reference, "val").items()]
    assert validations == [(1, 6), (3, 12), (5, 18)]
    assert [p.name for p in list_checkpoints(reference)] == ["step-6", "step-12", "step-18"]
    reset_accelerate()
    run_dir = tmp_path / "resumed"
    assert trainer.run(FakeTask(replace(base, run_dir=str(run_dir), run=replace(run, max_steps=8)))) == 0
    reset_accelerate()
    assert trainer.run(FakeTask(replace(base, run_dir=str(run_dir), run=run))) == 0
    for split in ("train", "val"):
        ref, got = train_lines(reference, split), train_lines(run_dir, split)
        assert sorted(got) == sorted(ref)
        assert all(got[k]["loss"] == pytest.approx(ref[k]["loss"], abs=1e-6) for k in ref), split

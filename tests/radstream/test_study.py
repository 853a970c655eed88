"""`radstream study` on a tiny synthetic source with the tiny protocol: the tables, pictures and run layout,
and a rerun that trains nothing again."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from radstream import workflow as stages
from radstream.cli import main
from radstream.demo import RECIPES
from radstream.study import FULL, make_protocol
from radstream.train.sweep import STUDY_LR_GRID

REPO = Path(__file__).resolve().parents[2]


def test_full_protocol_is_the_studys() -> None:
    assert len(FULL.lrs) == 10 and FULL.seeds == FULL.train_seeds == 3 and FULL.patience == 10
    assert FULL.fractions == (0.01, 0.1, 1.0)
    printed = subprocess.run(["bash", str(REPO / "slurm" / "sweep_lr.sbatch"), "--print-lrs"], check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    assert tuple(map(float, printed)) == STUDY_LR_GRID  # one grid for the study command and the SLURM sweeps
    small = make_protocol("small")  # the demo's protocol on the user's files, for a CPU
    assert small.recipes == RECIPES and small.max_tokens == 64 and small.min_steps == 100
    tiny = make_protocol("tiny", lrs=[1e-3, 2e-3], seeds=2, fractions=[1.0])
    assert tiny.lrs == (1e-3, 2e-3) and tiny.seeds == tiny.train_seeds == 2 and tiny.fractions == (1.0,)


def test_grid_runs_every_fraction_lr_and_seed_once(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_stage(stage, args, log_file, prefix, env=None):
        run_dir = Path(next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text("{}")
        calls.append((stage, args))

    monkeypatch.setattr(stages, "run_stage", fake_stage)
    protocol = make_protocol("full", lrs=[1e-4, 1e-3], seeds=2, fractions=[0.01, 1.0])
    model = stages.TrainedModel("finetune", "radstream.train.finetune", ("model.init=/runs/mae",))
    stages.stage_grid(tmp_path, tmp_path / "shards", model, protocol, "study")
    assert len(calls) == 2 * 2 * 2 and {stage for stage, _ in calls} == {"radstream.train.finetune"}
    args = calls[-1][1]
    assert args[:2] == ["--config", str(REPO / "configs" / "finetune" / "vit.yaml")]
    assert {"loader.label_fraction=1.0", "run.seed=1", "optim.lr=0.001", "run.patience=10"} <= set(args)
    assert "model.init=/runs/mae" in args
    assert (tmp_path / "runs" / "finetune" / "f0.01" / "lr-0.0001" / "seed-1" / "results.json").is_file()
    stages.stage_grid(tmp_path, tmp_path / "shards", model, protocol, "study")
    assert len(calls) == 8  # every run finished: nothing runs again


@pytest.mark.slow
@pytest.mark.long
def test_tiny_study_writes_the_tables_and_resumes(tmp_path: Path, capsys) -> None:
    from radstream.ingest.synth import synthesize

    synthesize(tmp_path / "src", n=80, seed=0, max_side=256)
    out = tmp_path / "study"
    argv = ["study", str(tmp_path / "src" / "images"), str(out), "--labels", "folder", "--protocol", "tiny",
            "--fractions", "1", "--workers", "1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/5] shards", "[2/5] MAE pretraining", "[4/5] supervised", "[5/5] report"):
        assert f"study: {stage}" in printed
    table = printed.split("## Table 1: full data")[1].split("##")[0]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in table.splitlines()[3:]
        if "|" in line
    }
    cnn = next(r for r in rows if r == "ResNet50" or r.startswith("CNN baseline ("))  # named by its network
    for row in (cnn, "ViT", "MAE probe (mean)", "MAE fine-tuned"):
        assert 0.0 <= float(rows[row].split("±")[0]) <= 1.0, row
    for model in ("vit", "cnn", "finetune"):
        assert (out / "runs" / model / "f1" / "lr-0.001" / "seed-0" / "results.json").is_file()
    card = (out / "encoder" / "README.md").read_text()  # the model card lists the fine-tuning of its weights
    assert "fine-tuned (mae_finetune" in card and (out / "encoder" / "model.safetensors").is_file()
    assert {"bins.png", "mae_loss.png", "accuracy_vs_fraction.png"} <= {
        p.name for p in (out / "pictures").iterdir()
    }

    start = time.perf_counter()
    assert main(argv) == 0  # every stage is reused
    assert "study: train." not in capsys.readouterr().out
    assert time.perf_counter() - start < 30

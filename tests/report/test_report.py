"""radstream report: LR selection on validation accuracy, the study's tables, MAE pretraining sweeps, metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from radstream.cli import add_report_parser
from radstream.core.config import load_config, to_yaml
from radstream.report.report import HEADER, MODELS, STUDY, markdown, prior_rates, select_best, write_report
from radstream.report.report_files import RunRecord, collect
from radstream.report.report_mae import (
    MAE_HEADER,
    MAE_TITLE,
    PretrainRecord,
    choose_pretrain_lr,
    collect_pretrain,
)
from radstream.train.config import PretrainConfig
from radstream.train.metrics import balanced_accuracy, confusion_matrix, per_class_recall

LRS = (1e-3, 1e-2, 1e-1)


def record(model="vit", fraction=1.0, seed=0, lr=1e-3, val=0.5, test=0.5) -> RunRecord:
    return RunRecord(model, fraction, seed, lr, val, test, model, "x")


def test_lr_with_best_mean_validation_accuracy_is_chosen_not_best_test() -> None:
    records = [
        # lr 1e-2 has the best validation mean; lr 1e-1 has a better test accuracy, which must not matter
        *(record(lr=1e-3, seed=s, val=0.70, test=0.70) for s in range(3)),
        *(
            record(lr=1e-2, seed=s, val=v, test=t)
            for s, v, t in ((0, 0.90, 0.80), (1, 0.80, 0.82), (2, 0.85, 0.84))
        ),
        *(
            record(lr=1e-1, seed=s, val=v, test=0.99)
            for s, v in (
                (
                    0,
                    0.95,
                ),
                (1, 0.70),
                (2, 0.70),
            )
        ),
    ]
    (sel,) = select_best(records)
    assert sel.lr == 1e-2
    assert sel.val_acc_mean == pytest.approx(0.85)
    assert sel.test_acc_mean == pytest.approx(0.82)
    assert sel.test_acc_std == pytest.approx(np.std([0.80, 0.82, 0.84], ddof=1))
    assert sel.seeds == (0, 1, 2) and sel.lrs_searched == 3
    tie = [record(lr=1e-1, val=0.9, test=0.1), record(lr=1e-3, val=0.9, test=0.2)]
    assert select_best(tie)[0].lr == 1e-3  # ties go to the smaller rate


def write_runs(root: Path) -> None:
    """A probe result and a supervised LR sweep, as radstream.eval.probe and radstream.train.supervised write them."""
    rng = np.random.default_rng(0)
    heads = []
    for agg in ("flattened", "mean", "cls"):
        for fraction in (0.01, 0.1, 1.0):
            for seed in range(3):
                for lr in LRS:
                    good = lr == 1e-2
                    val = (0.9 if good else 0.6) + 0.01 * seed
                    test = (STUDY.get((f"probe_{agg}", fraction), 0.9) if good else 0.5) + 0.01 * (seed - 1)
                    heads.append(
                        {
                            "model": f"probe_{agg}",
                            "aggregation": agg,
                            "fraction": fraction,
                            "seed": seed,
                            "lr": lr,
                            "val_acc": val,
                            "test_acc": test,
                        }
                    )
    (root / "probe").mkdir(parents=True)
    (root / "probe" / "probe_results.json").write_text(json.dumps({"kind": "probe", "heads": heads}))
    for model, arch in (("vit", "vit_base_patch16_224"), ("cnn", "resnet50")):
        for fraction in (0.01, 1.0):
            for seed in range(2):
                for lr in LRS:
                    run = root / "sweep" / f"{model}-{fraction}-{lr}-{seed}"
                    run.mkdir(parents=True)
                    val = float(rng.uniform(0.5, 0.6)) + (0.3 if lr == 1e-1 else 0.0)
                    result = {
                        "kind": "supervised",
                        "model": model,
                        "arch": arch,
                        "fraction": fraction,
                        "seed": seed,
                        "lr": lr,
                        "val_acc": val,
                        "test_acc": val - 0.05,
                    }
                    (run / "results.json").write_text(json.dumps(result))
    for fraction in (
        0.01,
        0.1,
        1.0,
    ):  # MAE fine-tuning (radstream.train.finetune): every regime, best LR 1e-3
        for seed in range(2):
            for lr in LRS:
                run = root / "finetune" / f"f{fraction}-{lr}-{seed}"
                run.mkdir(parents=True)
                val = 0.9 if lr == 1e-3 else 0.7
                result = {"kind": "supervised", "model": "mae_finetune", "arch": "vit_base_patch16_224",
                          "fraction": fraction, "seed": seed, "lr": lr, "val_acc": val, "test_acc": val - 0.01 * seed,
                          "checkpoint": "/runs/mae/best"}  # fmt: skip
                (run / "results.json").write_text(json.dumps(result))
    (root / "sweep" / "other").mkdir()
    (root / "sweep" / "other" / "results.json").write_text(json.dumps({"kind": "something else"}))


def parse_tables(text: str) -> dict[str, list[list[str]]]:
    """results.md → {section title: rows of cells, header first}."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
            tables[title] = []
        elif line.startswith("|") and not line.startswith("|---") and title:
            tables[title].append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_report_has_the_study_rows_and_columns(tmp_path: Path) -> None:
    write_runs(tmp_path / "runs")
    out = tmp_path / "results"
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(tmp_path / "runs"), "--out", str(out)])
    assert args.func(args) == 0
    tables = parse_tables((out / "results.md").read_text())
    assert list(tables) == ["Table 1: full data", "Table 2: 1% of the labels", "Table 3: 10% of the labels"]
    labels = [
        f"{label} (resnet50)" if model == "cnn" else label for model, label in MODELS
    ]  # the CNN's network
    for fraction, title in ((1.0, "Table 1: full data"), (0.01, "Table 2: 1% of the labels")):
        header, *rows = tables[title]
        assert tuple(header) == HEADER
        assert [r[0] for r in rows] == labels
        for (model, _), row in zip(MODELS[:5], rows, strict=False):  # the study's rows
            assert float(row[2]) == STUDY[(model, fraction)]
            assert row[3] in ("0.01", "0.1")  # the chosen LR
            mean, std = (float(v) for v in row[1].split("±"))
            assert 0 < mean < 1 and std >= 0
        probe_cls = rows[4]
        assert float(probe_cls[1].split("±")[0]) == pytest.approx(STUDY[("probe_cls", fraction)], abs=1e-4)
        assert probe_cls[3] == "0.01" and probe_cls[4] == "3"
        assert rows[1][3] == "0.1" and rows[1][4] == "2"  # supervised ViT: its sweep's best LR, 2 seeds
        assert rows[5][0] == "MAE fine-tuned" and rows[5][1] == "0.8950 ± 0.0071" and rows[5][2] == "—"
        assert rows[5][3] == "0.001" and rows[5][4] == "2"  # its own sweep's best LR; the study has no figure
    ten = tables["Table 3: 10% of the labels"]
    assert ten[1][1] == "—" and ten[3][2] == "—"  # no ViT runs at 10%, and no study figure
    assert ten[6][:2] == ["MAE fine-tuned", "0.8950 ± 0.0071"]  # fine-tuning has a row in every table
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("fraction,model,label,arch,test_acc_mean")
    assert len(csv_rows) == 1 + 3 * 3 + 2 * 2 + 3
    assert sum(",mae_finetune,MAE fine-tuned," in r for r in csv_rows) == 3
    assert (out / "accuracy_vs_fraction.png").stat().st_size > 1000


def test_collect_refuses_the_same_run_twice(tmp_path: Path) -> None:
    write_runs(tmp_path / "a")
    write_runs(tmp_path / "b")
    assert len(collect([tmp_path / "a"])) == 3 * 3 * 3 * 3 + 2 * 2 * 2 * 3 + 3 * 2 * 3
    with pytest.raises(ValueError, match="appears in both"):
        collect([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="no probe_results.json"):
        write_report([tmp_path / "a" / "sweep" / "other"], tmp_path / "out")


# ------------------------------------------------------------------------------------- MAE pretraining

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "debug.yaml"


def write_mae_run(
    run_dir: Path,
    base_lr: float,
    val: float | None,
    mse: float,
    *,
    seed: int = 0,
    epochs: int = 3,
    config: bool = True,
) -> None:
    """A finished radstream.train.pretrain run folder: its resolved config.yaml and summary.json (global batch 16)."""
    run_dir.mkdir(parents=True)
    if config:
        overrides = [f"shards={run_dir}", f"run_dir={run_dir}", f"optim.lr={base_lr}", "optim.lr_rule=per_256", f"run.seed={seed}"]  # fmt: skip
        (run_dir / "config.yaml").write_text(to_yaml(load_config(PretrainConfig, RECIPE, overrides)))
    summary = {
        "stopped": "early_stop" if val is not None else "max_steps", "epochs_completed": epochs, "steps": 7 * epochs,
        "best_val_loss": val, "best_epoch": epochs - 1 if val is not None else -1, "test_loss": mse * 1.1,
        "test_mse": mse, "test_mse_study": mse, "objective": "pixel MSE, masked patches", "test_images": 9,
        "tested_weights": "best", "global_batch": 16,
        "peak_lr": base_lr * 16 / 256, "num_processes": 2,
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def write_mae_sweep(sweep: Path) -> None:
    """An MAE LR sweep as slurm/sweep_lr.sbatch leaves it: one lr-<rate> folder per rate. 3e-4 has the lowest
    validation loss, 1e-3 the lowest test MSE (which must not decide), 3e-3 ended before an epoch did."""
    runs = ((1e-4, 0.031, 0.0040), (3e-4, 0.012, 0.0031), (1e-3, 0.019, 0.0024), (3e-3, None, 0.5))
    for lr, val, mse in runs:
        write_mae_run(sweep / f"lr-{lr:g}", lr, val, mse, epochs=0 if val is None else 3)


def test_mae_sweep_report_marks_the_lowest_validation_loss(tmp_path: Path, capsys) -> None:
    write_mae_sweep(tmp_path / "sweep")
    (tmp_path / "sweep" / "lr-0.0001" / "checkpoints").mkdir()  # summary.json-free folders are ignored
    (tmp_path / "sweep" / "other").mkdir()
    (tmp_path / "sweep" / "other" / "summary.json").write_text(json.dumps({"kind": "a build summary"}))
    out = tmp_path / "report"
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(tmp_path / "sweep"), "--out", str(out)])
    assert args.func(args) == 0
    assert "pretrain.csv" in capsys.readouterr().out
    tables = parse_tables((out / "results.md").read_text())
    assert list(tables) == [MAE_TITLE]  # no accuracy results: no empty accuracy tables
    header, *rows, study = tables[MAE_TITLE]
    assert tuple(header) == MAE_HEADER
    assert [(r[0], r[1]) for r in rows] == [
        ("lr-0.0001", "0.0001"), ("lr-0.0003", "0.0003"), ("lr-0.001", "0.001"), ("lr-0.003", "0.003")
    ]  # fmt: skip
    assert [r[-1] for r in rows] == ["", "✓", "", ""]  # the lowest validation loss, not the lowest test MSE
    assert rows[1][2:9] == [
        "1.87e-05",
        "0.012",
        "0.0031",
        "0.00341",
        "pixel MSE, masked patches",
        "3",
        "early_stop",
    ]
    # peak LR: base x 16 / 256; the study MSE, then the run's own objective under its name
    assert rows[3][3] == "—"  # no validation loss: listed, never chosen
    assert (
        rows[0][9].startswith("ViT 32×2, patch 16") and rows[0][10] == "scratch"
    )  # the MAE rows name theirs
    assert (
        "Differs from the study's: width 32 (study: 768), depth 2 (study: 12)"
        in (out / "results.md").read_text()
    )
    assert study[0] == "Study" and float(study[4]) == 0.002475 and study[7] == "36"
    csv_rows = (out / "pretrain.csv").read_text().splitlines()
    assert csv_rows[0].startswith("run,base_lr,peak_lr,seed,best_val_loss,test_mse,epochs,stopped,chosen")
    assert [row.split(",")[8] for row in csv_rows[1:]] == ["0", "1", "0", "0"]
    assert not (out / "results.csv").exists() and not (out / "accuracy_vs_fraction.png").exists()


def test_mae_runs_beside_accuracy_results_leave_the_accuracy_tables_unchanged(tmp_path: Path) -> None:
    write_runs(tmp_path / "runs")
    alone = markdown(select_best(collect([tmp_path / "runs"])))
    write_mae_sweep(tmp_path / "runs" / "mae")
    write_report([tmp_path / "runs"], tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.startswith(alone.rstrip("\n") + "\n\n## MAE pretraining\n")
    assert list(parse_tables(text))[-1] == MAE_TITLE
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 1 + 3 * 3 + 2 * 2 + 3
    assert len((tmp_path / "out" / "pretrain.csv").read_text().splitlines()) == 1 + 4


def test_mae_lr_choice_averages_seeds_and_prefers_the_smaller_rate_on_ties(tmp_path: Path) -> None:
    def rec(lr: float, seed: int, val: float | None) -> PretrainRecord:
        return PretrainRecord(f"lr-{lr}", lr, lr / 16, seed, val, 0.01, 3, "done", "x")

    # 1e-3 has the best single run, 3e-4 the best mean over seeds
    records = [rec(3e-4, 0, 0.020), rec(3e-4, 1, 0.022), rec(1e-3, 0, 0.015), rec(1e-3, 1, 0.035)]
    assert choose_pretrain_lr(records) == 3e-4
    assert choose_pretrain_lr([rec(1e-3, 0, 0.02), rec(1e-4, 0, 0.02)]) == 1e-4
    assert choose_pretrain_lr([rec(1e-3, 0, None)]) is None
    # without config.yaml the base rate comes back from the absolute one (global batch 16)
    write_mae_run(tmp_path / "a" / "lr-0.0003", 3e-4, 0.01, 0.003, config=False)
    (got,) = collect_pretrain([tmp_path / "a"])
    assert (got.base_lr, got.seed, got.run) == (3e-4, 0, "lr-0.0003")
    write_mae_run(tmp_path / "b" / "again", 3e-4, 0.02, 0.004)
    with pytest.raises(ValueError, match="MAE base lr 0.0003 seed 0 appears in both"):
        collect_pretrain([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="or MAE summary.json under"):
        write_report([tmp_path / "empty"], tmp_path / "out")


def test_metrics_from_the_confusion_matrix() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 1])
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert per_class_recall(cm) == [0.75, 0.5, 0.0, None]  # class 3 has no samples
    assert balanced_accuracy(cm) == pytest.approx((0.75 + 0.5 + 0.0) / 3)


def test_one_seed_has_no_spread_and_every_row_names_its_network(tmp_path: Path) -> None:
    """A spread over one seed is "—" (never "± 0.0000"); every row names its architecture and init, and what
    differs from the study's is flagged, the MAE rows too."""
    vit = {"kind": "vit", "name": "vit_tiny_patch16_224", "width": 192, "depth": 12, "patch": 16,
           "bins": ["64x96", "96x64"]}  # fmt: skip
    mae = {"kind": "mae", "name": "vit_base_patch16_224", "width": 768, "depth": 12, "patch": 16,
           "bins": ["224x224"]}  # fmt: skip
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "results.json").write_text(json.dumps({
        "kind": "supervised", "model": "vit", "arch": "vit_tiny_patch16_224", "fraction": 1.0, "seed": 0,
        "lr": 1e-3, "val_acc": 0.5, "test_acc": 0.6, "architecture": vit, "init": "scratch",
        "confusion": [[3, 1], [0, 1]]}))  # fmt: skip
    heads = [{"model": "probe_cls", "aggregation": "cls", "fraction": 1.0, "seed": s, "lr": 0.1, "val_acc": 0.7,
              "test_acc": 0.7 + 0.01 * s} for s in (0, 1)]  # fmt: skip
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe_results.json").write_text(
        json.dumps(
            {"kind": "probe", "heads": heads, "architecture": mae, "init": "MAE run mae (from timm:vit_base)"}
        )
    )
    write_report([tmp_path], tmp_path / "out")
    rows = {
        r[0]: r for r in parse_tables((tmp_path / "out" / "results.md").read_text())["Table 1: full data"]
    }
    assert rows["ViT"][1] == "0.6000 ± —" and rows["ViT"][4] == "1"
    assert rows["ViT"][5] == "ViT 192×12, patch 16, 2 bins (64x96 … 96x64)" and rows["ViT"][6] == "scratch"
    assert rows["MAE probe (CLS)"][1] == "0.7050 ± 0.0071"
    assert rows["MAE probe (CLS)"][5] == "ViT 768×12, patch 16, 224x224"
    assert rows["MAE probe (CLS)"][6] == "MAE run mae (from timm:vit_base)"
    text = (tmp_path / "out" / "results.md").read_text()
    assert (
        "ViT: width 192 (study: 768), input 2 bins (study: 224x224), init scratch (study: ImageNet)" in text
    )
    assert (
        "MAE probe (CLS):" not in text
    )  # the study's encoder, its input and a pretrained init: nothing to flag
    csv = (tmp_path / "out" / "results.csv").read_text().splitlines()
    vit_row = next(line for line in csv if ",vit," in line)
    assert ",0.600000,,0.500000," in vit_row  # no std for one seed


def test_cnn_row_names_its_network(tmp_path: Path) -> None:
    """The CNN row (``model.kind: cnn``) names the network that ran, the study's resnet50 or the demo's resnet18,
    and flags one that is not the study's; a result file of an earlier version (row id "resnet50") is the
    same row."""
    for arch, model, kind in (("resnet18", "cnn", "cnn"), ("resnet50", "resnet50", "resnet50")):
        (tmp_path / arch).mkdir()
        (tmp_path / arch / "results.json").write_text(json.dumps({
            "kind": "supervised", "model": model, "arch": arch, "fraction": 1.0 if arch == "resnet18" else 0.01,
            "seed": 0, "lr": 1e-3, "val_acc": 0.5, "test_acc": 0.6, "init": "scratch",
            "architecture": {"kind": kind, "name": arch, "bins": ["224x224"]}}))  # fmt: skip
    write_report([tmp_path], tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    tables = parse_tables(text)
    cnn_rows = {t: [r[0] for r in rows if r[0].startswith(("CNN", "ResNet"))] for t, rows in tables.items()}
    assert cnn_rows["Table 1: full data"] == ["CNN baseline (resnet18)"]
    assert cnn_rows["Table 2: 1% of the labels"] == ["CNN baseline (resnet50)"]
    assert "name resnet18 (study: resnet50)" in text and "name resnet50 (study" not in text


def test_init_names() -> None:
    from radstream.train.provenance import init_name

    assert init_name(None) == "scratch"
    assert init_name("timm:resnet50.a1_in1k") == "timm:resnet50.a1_in1k"
    assert init_name("/runs/mae/checkpoints/step-40") == "MAE run mae"
    assert init_name("/runs/mae/best") == "MAE run mae"
    assert init_name("/w/imagenet.pth") == "weights imagenet.pth"


def test_prior_only_rate_follows_the_training_labels_of_each_regime(tmp_path: Path) -> None:
    """A model can only learn the class prior it was shown: with all labels the bar is the test majority
    class; a regime of one image per class has no prior, and its bar is the mean class share. Rows at or
    below their regime's bar are named under the table."""
    confusion = [[6, 0, 0], [0, 2, 0], [0, 0, 2]]  # test split: 60% / 20% / 20%
    runs = ((1.0, [50, 10, 10], 0.8, "done", 2), (0.01, [1, 1, 1], 0.3, "early_stop", 0))
    for fraction, counts, test, stopped, best in runs:
        run = tmp_path / f"vit-{fraction}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({
            "kind": "supervised", "model": "vit", "arch": "vit_tiny_patch16_224", "fraction": fraction, "seed": 0,
            "lr": 1e-3, "val_acc": 0.5, "test_acc": test, "confusion": confusion,
            "train_class_counts": counts, "stopped": stopped, "best_epoch": best, "epochs": 3}))  # fmt: skip
    assert prior_rates([tmp_path]) == pytest.approx({1.0: 0.6, 0.01: 1 / 3})
    write_report([tmp_path], tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    full, one = text.split("## Table 2")[0].split("## Table 1")[1], text.split("## Table 2")[1]
    assert "Prior-only rate: 0.6000" in full and "At or below it" not in full
    assert "Prior-only rate: 0.3333" in one and "At or below it: ViT." in one
    # the rows say it: ended on the cap with the best epoch last, or at the prior-only rate
    assert "| ViT | 0.8000 ± — ⚠ may be under-trained (1/1 seeds best at the cap) |" in full
    assert "| ViT | 0.3000 ± — ⚠ not trained (≤ prior-only) |" in one and "under-trained" not in one


def test_under_trained_is_the_cap_reached_with_the_best_epoch_last() -> None:
    from radstream.report.report_files import under_trained

    assert under_trained({"stopped": "done", "best_epoch": 2, "epochs": 3})  # a supervised run on its cap
    assert not under_trained({"stopped": "done", "best_epoch": 1, "epochs": 3})
    assert not under_trained({"stopped": "early_stop", "best_epoch": 2, "epochs": 3})
    assert under_trained({"capped": True, "best_epoch": 99, "epochs": 100})  # a probe head on its cap
    assert not under_trained({"capped": False, "best_epoch": 9, "epochs": 10})


def test_fine_tuned_rows_are_checked_against_the_studys_encoder() -> None:
    from radstream.train.provenance import differences, mae_run_init

    assert mae_run_init(Path("/out/runs/mae/best"), None) == "MAE run mae (from scratch)"
    assert (
        mae_run_init(Path("/out/runs/mae/checkpoints/step-9"), "/w/vit.pth")
        == "MAE run mae (from weights vit.pth)"
    )
    arch = {"kind": "mae_finetune", "name": "vit_small_patch16_224", "width": 96, "depth": 4, "patch": 16,
            "bins": ["224x224"]}  # fmt: skip
    found = differences(arch, "MAE run mae (from scratch)")
    assert found == [
        "width 96 (study: 768)",
        "depth 4 (study: 12)",
        "init MAE run mae (from scratch) (study: ImageNet)",
    ]


def test_pictures_name_the_network_as_the_table_does(tmp_path: Path, monkeypatch) -> None:
    """The demo's CNN is a resnet18: the accuracy-vs-fraction legend says so, as its table row does."""
    import matplotlib.axes

    from radstream.report.report import Selection, model_label, plot_fractions

    labels = []
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *a, **k: labels.append(k.get("label")) or original(self, *a, **k))  # fmt: skip
    rows = [Selection("cnn", f, 1e-3, 0.5, 0.5, 0.0, (0, 1), 1, "resnet18") for f in (0.01, 1.0)]
    rows += [Selection("probe_mean", 1.0, 1e-3, 0.5, 0.5, 0.0, (0,), 1, "MAE probe, mean")]
    plot_fractions(rows, tmp_path / "acc.png")
    assert labels == ["CNN baseline (resnet18)", "MAE probe (mean)"]
    assert (
        model_label("resnet50", "resnet18") == "CNN baseline (resnet18)" and model_label("vit", "x") == "ViT"
    )

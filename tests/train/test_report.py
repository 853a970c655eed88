"""radstream report: LR selection on validation accuracy, the study's tables, metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from train.report import (
    HEADER,
    MODELS,
    STUDY,
    RunRecord,
    add_report_parser,
    balanced_accuracy,
    collect,
    confusion_matrix,
    per_class_recall,
    select_best,
    write_report,
)

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
    """A probe result and a supervised LR sweep, as train.probe and train.supervised write them."""
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
    for model, arch in (("vit", "vit_base_patch16_224"), ("resnet50", "resnet50")):
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
    labels = [label for _, label in MODELS]
    for fraction, title in ((1.0, "Table 1: full data"), (0.01, "Table 2: 1% of the labels")):
        header, *rows = tables[title]
        assert tuple(header) == HEADER
        assert [r[0] for r in rows] == labels
        for (model, _), row in zip(MODELS, rows, strict=True):
            assert float(row[2]) == STUDY[(model, fraction)]
            assert row[3] in ("0.01", "0.1")  # the chosen LR
            mean, std = (float(v) for v in row[1].split("±"))
            assert 0 < mean < 1 and std >= 0
        probe_cls = rows[4]
        assert float(probe_cls[1].split("±")[0]) == pytest.approx(STUDY[("probe_cls", fraction)], abs=1e-4)
        assert probe_cls[3] == "0.01" and probe_cls[4] == "3"
        assert rows[1][3] == "0.1" and rows[1][4] == "2"  # supervised ViT: its sweep's best LR, 2 seeds
    ten = tables["Table 3: 10% of the labels"]
    assert ten[1][1] == "—" and ten[3][2] == "—"  # no ResNet50 runs at 10%, and no study figure
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("fraction,model,label,arch,test_acc_mean")
    assert len(csv_rows) == 1 + 3 * 3 + 2 * 2
    assert (out / "accuracy_vs_fraction.png").stat().st_size > 1000


def test_collect_refuses_the_same_run_twice(tmp_path: Path) -> None:
    write_runs(tmp_path / "a")
    write_runs(tmp_path / "b")
    assert len(collect([tmp_path / "a"])) == 3 * 3 * 3 * 3 + 2 * 2 * 2 * 3
    with pytest.raises(ValueError, match="appears in both"):
        collect([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="no probe_results.json"):
        write_report([tmp_path / "a" / "sweep" / "other"], tmp_path / "out")


def test_metrics_from_the_confusion_matrix() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 1])
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert per_class_recall(cm) == [0.75, 0.5, 0.0, None]  # class 3 has no samples
    assert balanced_accuracy(cm) == pytest.approx((0.75 + 0.5 + 0.0) / 3)

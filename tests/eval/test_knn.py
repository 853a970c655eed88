"""kNN evaluation of frozen embeddings (DINO's weighted kNN) and its row in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from radstream.eval.knn import knn_predict
from radstream.eval.probe import run
from radstream.report.report import markdown, select_best
from radstream.report.report_files import collect
from tests.eval.test_probe import small_cfg, synthetic_data, write_store


def reference_knn(train_x, train_y, query, num_classes, k, temperature) -> list[int]:
    """One query at a time, in plain Python: cosine, top k, exp(sim / T) votes."""
    preds = []
    for q in query.tolist():
        sims = []
        for x, y in zip(train_x.tolist(), train_y.tolist(), strict=True):
            dot = sum(a * b for a, b in zip(q, x, strict=True))
            sims.append((dot / (math.hypot(*q) * math.hypot(*x)), y))
        votes = [0.0] * num_classes
        for sim, y in sorted(sims, reverse=True)[:k]:
            votes[y] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=votes.__getitem__))
    return preds


def test_knn_matches_dino_weighted_votes():
    gen = torch.Generator().manual_seed(0)
    train_x, query = torch.randn(50, 5, generator=gen), torch.randn(23, 5, generator=gen)
    train_y = torch.randint(0, 4, (50,), generator=gen)
    for k, temperature in ((20, 0.07), (3, 1.0), (80, 0.5)):  # k above N: every row votes
        got = knn_predict(train_x, train_y, query, 4, k, temperature, chunk=7)
        assert got.tolist() == reference_knn(train_x, train_y, query, 4, k, temperature)
    # votes are weighted, not counted: two far neighbours of class 1 lose to one near neighbour of class 0
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    assert knn_predict(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.2]]), 2, k=3).tolist() == [0]


def test_probe_writes_knn_results_and_the_report_shows_them(tmp_path: Path) -> None:
    data = synthetic_data(n_train=120, n_val=60, n_test=90, dims={"cls": 8, "flattened": 32}, signal=1.5)
    write_store(tmp_path / "emb.zarr", data)
    cfg = small_cfg(embeddings=str(tmp_path / "emb.zarr"), out=str(tmp_path / "probe"),
                    aggregations=["flattened", "cls"], max_epochs=3)  # fmt: skip
    run(cfg, progress=False)
    knn = json.loads((tmp_path / "probe" / "knn_results.json").read_text())
    assert knn["kind"] == "knn"
    rows = {(r["aggregation"], r["fraction"]): r for r in knn["results"]}
    assert set(rows) == {(a, f) for a in ("flattened", "cls") for f in (0.5, 1.0)}
    assert rows[("cls", 0.5)]["train_rows"] == 60 and rows[("cls", 1.0)]["k"] == 20
    expected = knn_predict(
        data.features["train"]["cls"], data.labels["train"], data.features["test"]["cls"], 3
    )
    acc = float((expected == data.labels["test"]).double().mean())
    assert rows[("cls", 1.0)]["test_acc"] == pytest.approx(acc) and acc > 0.8  # chance: 1/3
    text = markdown(select_best(collect([tmp_path / "probe"])))
    line = next(x for x in text.splitlines() if x.startswith("| MAE kNN (CLS) |"))
    assert float(line.split("|")[2].split("±")[0]) == pytest.approx(acc, abs=1e-4)
    assert line.split("|")[4].strip() == "—"  # no learning rate to choose
    assert "| MAE kNN (mean) |" not in text  # no results: no row


def test_report_row_names_the_flattened_grid(tmp_path: Path) -> None:
    data = synthetic_data(dims={"flattened": 6})
    write_store(tmp_path / "emb.zarr", data)
    import zarr

    from radstream.eval.embed_store import read_attrs  # the store's name of its flattened aggregation

    zarr.open_group(str(tmp_path / "emb.zarr"), mode="a").attrs["aggregation_labels"] = {
        "flattened": "flattened (resampled to 14×14)"
    }
    assert read_attrs(tmp_path / "emb.zarr")["aggregation_labels"]["flattened"].endswith("14×14)")
    cfg = small_cfg(embeddings=str(tmp_path / "emb.zarr"), out=str(tmp_path / "probe"),
                    aggregations=["flattened"], max_epochs=2, knn_k=0)  # fmt: skip
    run(cfg, progress=False)
    assert not (tmp_path / "probe" / "knn_results.json").exists()
    text = markdown(select_best(collect([tmp_path / "probe"])))
    assert "| MAE probe (flattened (resampled to 14×14)) |" in text
    assert np.isfinite(
        float(next(x for x in text.splitlines() if "resampled" in x).split("|")[2].split("±")[0])
    )

"""Linear probes: the batched grid equals heads trained one by one, learns a planted signal, picks LRs, writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from radstream.eval import embed_store
from radstream.eval.embed_store import SplitRows, StagingWriter
from radstream.eval.probe import ProbeConfig, ProbeData, build_grids, lr_grid, make_groups, run
from radstream.eval.probe_grid import epoch_batches, train_grids
from radstream.train.optim import lr_at

CLASSES = 3


def synthetic_data(n_train=60, n_val=30, n_test=30, dims=None, signal=2.0, seed=0) -> ProbeData:
    """Embeddings whose class shifts a random direction by ``signal``; train fractions 0.5 ⊂ 1.0."""
    dims = dims or {"mean": 6, "cls": 4}
    rng = np.random.default_rng(seed)
    centers = {a: rng.normal(size=(CLASSES, d)) for a, d in dims.items()}
    features, labels = {}, {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        y = np.arange(n) % CLASSES
        features[split] = {
            a: torch.tensor(rng.normal(size=(n, d)) + signal * centers[a][y], dtype=torch.float32)
            for a, d in dims.items()
        }
        labels[split] = torch.tensor(y)
    fractions = np.zeros((n_train, 2), dtype=bool)
    fractions[:, 1] = True
    fractions[: n_train // 2, 0] = True
    keys = np.asarray([f"k{i:03d}" for i in range(n_train)], dtype=object)
    patients = np.asarray([f"p{i // 2}" for i in range(n_train)], dtype=object)  # two images a patient
    return ProbeData(
        features, labels, fractions, [0.5, 1.0], [f"c{i}" for i in range(CLASSES)], keys, patients
    )


def small_cfg(**kw) -> ProbeConfig:
    base = dict(
        embeddings="x",
        out="y",
        aggregations=["mean", "cls"],
        label_fractions=[0.5, 1.0],
        seeds=[0, 1],
        lr_min=0.01,
        lr_max=1.0,
        num_lrs=3,
        batch_size=16,
        max_epochs=4,
        patience=0,
        device="cpu",
    )
    return ProbeConfig(**{**base, **kw})


def reference_head(x, y, x_val, y_val, group, init_w, lr, cfg) -> dict:
    """One head with torch's own modules: BatchNorm1d(affine=False) + Linear, SGD, the grid's batch order."""
    exact = cfg.bn_momentum is None  # the subset's own statistics, never updated (momentum 0)
    bn = nn.BatchNorm1d(x.shape[1], affine=False, eps=cfg.bn_eps, momentum=0.0 if exact else cfg.bn_momentum)
    if exact:
        bn.running_mean.copy_(x[group.rows].mean(dim=0))
        bn.running_var.copy_(x[group.rows].var(dim=0))
    linear = nn.Linear(x.shape[1], CLASSES)
    with torch.no_grad():
        linear.weight.copy_(init_w)
        linear.bias.zero_()
    head = nn.Sequential(bn, linear)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    spe = group.steps_per_epoch(cfg.batch_size)
    best, bad = (-1.0, None), 0
    for epoch in range(cfg.max_epochs):
        if cfg.patience and bad >= cfg.patience:
            break  # early stopping: this head is done
        head.train()
        for i, rows in enumerate(epoch_batches(group, cfg.batch_size, epoch)):
            step = epoch * spe + i
            for pg in opt.param_groups:
                pg["lr"] = lr * lr_at(
                    step, peak_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=cfg.max_epochs * spe
                )
            rows = torch.from_numpy(rows)
            loss = nn.functional.cross_entropy(head(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            acc = float((head(x_val).argmax(1) == y_val).double().mean())
        bad += 1
        if acc > best[0]:
            scale = torch.rsqrt(bn.running_var + cfg.bn_eps)
            folded = (linear.weight * scale).detach().clone()
            best, bad = (
                (acc, folded, (linear.bias - linear.weight @ (bn.running_mean * scale)).detach().clone()),
                0,
            )
    return {
        "weight": linear.weight.detach(),
        "bias": linear.bias.detach(),
        "mean": bn.running_mean,
        "var": bn.running_var,
        "best_acc": best[0],
        "best_weight": best[1],
        "best_bias": best[2],
    }


@pytest.mark.parametrize("bn_momentum", [0.1, None])
@pytest.mark.parametrize("patience", [0, 1])
def test_grid_in_one_pass_matches_heads_trained_one_by_one(patience: int, bn_momentum: float | None) -> None:
    torch.manual_seed(0)
    data = synthetic_data(signal=0.7)  # a weak signal: accuracies still move between epochs
    cfg = small_cfg(
        weight_decay=1e-3, patience=patience, max_epochs=4 if patience == 0 else 8, bn_momentum=bn_momentum
    )
    groups = make_groups(data, cfg)
    grids = build_grids(data, groups, cfg)
    inits = {agg: grid.weight.clone() for agg, grid in grids.items()}
    train_grids(grids, data, groups, cfg, progress=False)
    lrs = lr_grid(cfg)
    x, y = data.features["train"], data.labels["train"]
    for agg, grid in grids.items():
        for s, group in enumerate(groups):
            for i, lr in enumerate(lrs):
                ref = reference_head(
                    x[agg],
                    y,
                    data.features["val"][agg],
                    data.labels["val"],
                    group,
                    inits[agg][s, :, i].T,
                    lr,
                    cfg,
                )
                torch.testing.assert_close(grid.weight[s, :, i].T, ref["weight"], atol=1e-5, rtol=0)
                torch.testing.assert_close(grid.bias[s, i], ref["bias"], atol=1e-5, rtol=0)
                if patience == 0:  # the group's BatchNorm statistics move on while any of its heads trains
                    torch.testing.assert_close(grid.running_mean[s], ref["mean"], atol=1e-5, rtol=0)
                    torch.testing.assert_close(grid.running_var[s], ref["var"], atol=1e-5, rtol=1e-5)
                assert float(grid.best_acc[s, i]) == pytest.approx(ref["best_acc"])
                torch.testing.assert_close(
                    grid.best_weight[s, :, i].T, ref["best_weight"], atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(grid.best_bias[s, i], ref["best_bias"], atol=1e-5, rtol=1e-5)
    if patience:  # heads stopped at different epochs, so the grid skipped stopped learning rates
        epochs = torch.cat([grid.epochs.flatten() for grid in grids.values()])
        assert len(set(epochs.tolist())) > 1 and int(epochs.min()) < cfg.max_epochs
    # the heads really differ (learning rates, groups), so the comparison above is not trivially equal
    assert not torch.allclose(grids["mean"].weight[0, :, 0], grids["mean"].weight[0, :, 2])
    assert not torch.allclose(grids["mean"].weight[0], grids["mean"].weight[2])


def test_index_selected_groups_step_like_slices() -> None:
    """A non-contiguous set of groups (index tensor, copies written back) steps exactly as each group alone."""
    data = synthetic_data()
    cfg = small_cfg(aggregations=["mean"], seeds=[0, 1, 2], label_fractions=[1.0])
    groups = make_groups(data, cfg)
    together, alone = build_grids(data, groups, cfg)["mean"], build_grids(data, groups, cfg)["mean"]
    x, y = data.features["train"]["mean"], data.labels["train"]
    idx = torch.stack([torch.from_numpy(epoch_batches(groups[s], 16, 0)[0]) for s in (0, 2)])
    factor = torch.tensor([1.0, 0.5])
    together.train_step(x, y, idx, torch.tensor([0, 2]), factor)
    for i, s in enumerate((0, 2)):
        alone.train_step(x, y, idx[i : i + 1], slice(s, s + 1), factor[i : i + 1])
    for name in ("weight", "bias", "momentum_weight", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(together, name), getattr(alone, name))
    assert torch.equal(together.weight[1], build_grids(data, groups, cfg)["mean"].weight[1])  # untouched


def test_heads_stop_after_patience_and_keep_their_best_epoch() -> None:
    data = synthetic_data()
    cfg = small_cfg(
        aggregations=["cls"], label_fractions=[1.0], seeds=[0], num_lrs=2, patience=2, max_epochs=50
    )
    grid = build_grids(data, make_groups(data, cfg), cfg)["cls"]
    sel = slice(0, 1)
    for epoch, accs in enumerate([(0.5, 0.5), (0.7, 0.4), (0.6, 0.4), (0.6, 0.9), (0.9, 0.9)]):
        grid.end_epoch(sel, torch.tensor([accs], dtype=torch.float64), torch.tensor([epoch]))
    # head 0: best 0.7 at epoch 1, then two epochs without a better one (2, 3): stopped before its 0.9
    # head 1: no gain at epochs 1-2 (stopped at patience 2) before its 0.9
    assert grid.stopped.tolist() == [[True, True]]
    assert grid.best_acc.tolist() == [[0.7, 0.5]]
    assert grid.best_epoch.tolist() == [[1, 0]]
    assert grid.epochs.tolist() == [[4, 3]]


def write_store(path, data: ProbeData) -> None:
    """The synthetic data as an embedding store, through the store's own writer, and the samples table its
    "shards" names (the training rows' patients: seeds >= 1 draw their own subsets by patient)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dims = {a: x.shape[1] for a, x in data.features["train"].items()}
    shards = path.parent / "shards"
    shards.mkdir()
    n_train = len(data.labels["train"])
    samples = {"key": [f"train{i}" for i in range(n_train)], "split": ["train"] * n_train,
               "patient_id": [str(p) for p in data.train_patients]}  # fmt: skip
    pq.write_table(pa.table(samples), shards / "samples.parquet")
    embed_store.create_store(
        path,
        {
            "shards": str(shards),
            "checkpoint": "synthetic",
            "class_names": data.class_names,
            "label_fractions": data.levels,
            "aggregations": list(dims),
            "dims": dims,
        },
    )
    for split in ("train", "val", "test"):
        n = len(data.labels[split])
        fractions = data.train_fractions if split == "train" else np.zeros((n, 2), bool)
        rows = SplitRows([f"{split}{i}" for i in range(n)], data.labels[split].numpy(), fractions)
        embed_store.prepare_split(path, split, rows, 16, 1)
        writer = StagingWriter(path, split, 0, 1, {})
        writer.add(np.arange(n), {a: x.numpy() for a, x in data.features[split].items()})
        writer.flush(finished=True)
        embed_store.assemble_split(path, split, 0, 1)
        embed_store.finish_split(path, split)


def test_planted_signal_is_learned_far_above_chance_and_results_are_written(tmp_path) -> None:
    data = synthetic_data(
        n_train=120, n_val=60, n_test=90, dims={"mean": 16, "cls": 8, "flattened": 32}, signal=1.0
    )
    write_store(tmp_path / "emb.zarr", data)
    cfg = small_cfg(
        embeddings=str(tmp_path / "emb.zarr"),
        out=str(tmp_path / "probe"),
        aggregations=["flattened", "mean", "cls"],
        max_epochs=15,
        patience=5,
        lr_min=1e-3,
        lr_max=1.0,
    )
    results = run(cfg, progress=False)
    summary = {(r["aggregation"], r["fraction"]): r for r in results["summary"]}
    assert set(summary) == {(a, f) for a in ("flattened", "mean", "cls") for f in (0.5, 1.0)}
    for row in summary.values():
        assert row["test_acc_mean"] > 0.8  # chance is 1/3
        assert len(row["seeds"]) == 2
    from radstream.report.report import select_best
    from radstream.report.report_files import collect

    reported = {(s.model, s.fraction): s.lr for s in select_best(collect([tmp_path / "probe"]))}
    for chosen in results["chosen"]:  # one LR for every seed: the best validation accuracy mean over seeds
        mine = [h for h in results["heads"] if (h["aggregation"], h["fraction"]) == (chosen["aggregation"],
                                                                                     chosen["fraction"])]  # fmt: skip
        by_lr = {
            lr: np.mean([h["val_acc"] for h in mine if h["lr"] == lr])
            for lr in sorted({h["lr"] for h in mine})
        }
        assert len(mine) == 3 * 2 and chosen["lr"] == max(by_lr, key=by_lr.get)
        assert (
            chosen["lr"] == reported[(chosen["model"], chosen["fraction"])]
        )  # the report's rule, the same LR
        assert sum(map(sum, chosen["confusion"])) == 90
    for row in summary.values():
        assert len(set(row["lrs"])) == 1
    out = tmp_path / "probe"
    assert json.loads((out / "probe_results.json").read_text())["kind"] == "probe"
    assert len((out / "probe_results.csv").read_text().splitlines()) == 1 + 3 * 2 * 2 * 3
    assert (out / "confusion_cls_100%.png").stat().st_size > 1000
    heads = torch.load(out / "chosen_heads.pt")
    head = heads["mean/1.0/0"]
    logits = data.features["test"]["mean"] @ head["weight"].T + head["bias"]
    acc = float((logits.argmax(1) == data.labels["test"]).float().mean())
    chosen = next(
        c for c in results["chosen"] if (c["aggregation"], c["fraction"], c["seed"]) == ("mean", 1.0, 0)
    )
    assert acc == pytest.approx(
        chosen["test_acc"], abs=1e-6
    )  # the saved head (BatchNorm folded) is the scored one


def test_batchnorm_statistics_are_exact_at_one_percent() -> None:
    """At 1% of 3200 rows (32 rows, one batch) an epoch is one step: the heads must still evaluate with the
    subset's own mean and variance, not a running average a few steps from its start."""
    data = synthetic_data(n_train=3200, dims={"mean": 6})
    data.features["train"]["mean"] += 5.0  # far from BatchNorm's initial statistics (0, 1)
    fractions = np.zeros((3200, 2), dtype=bool)
    fractions[:32, 0] = fractions[:, 1] = True
    data = ProbeData(data.features, data.labels, fractions, [0.01, 1.0], data.class_names)
    cfg = small_cfg(aggregations=["mean"], label_fractions=[0.01], seeds=[0], max_epochs=3, batch_size=256)
    groups = make_groups(data, cfg)
    assert groups[0].steps_per_epoch(cfg.batch_size) == 1
    grids = build_grids(data, groups, cfg)
    train_grids(grids, data, groups, cfg, progress=False)
    subset = data.features["train"]["mean"][:32]
    torch.testing.assert_close(grids["mean"].running_mean[0], subset.mean(dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(grids["mean"].running_var[0], subset.var(dim=0), atol=1e-5, rtol=1e-5)


def test_a_one_step_epoch_trains_its_minimum_steps_before_early_stopping() -> None:
    """The 0.5 subset (30 rows, batch 256) is one step an epoch: patience 1 and 5 epochs would stop every
    head within 5 steps; min_steps=12 holds each head for 12 steps (the cap raised to cover them)."""
    data = synthetic_data()
    cfg = small_cfg(label_fractions=[0.5], seeds=[0], batch_size=256, patience=1, max_epochs=5, min_steps=12)
    groups = make_groups(data, cfg)
    grids = build_grids(data, groups, cfg)
    assert train_grids(grids, data, groups, cfg, progress=False) == 12
    for grid in grids.values():
        assert grid.epochs.min() == 12 and grid.stopped.all()

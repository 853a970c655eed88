"""Linear probing of cached embeddings: a whole grid of heads trained in one pass.

    python -m radstream.eval.probe --embeddings EMB.zarr --out RUN_DIR [--config configs/probe/default.yaml] [key=value]

A head is ``BatchNorm1d(affine=False) + Linear`` (MAE's linear-probe recipe) trained with SGD + momentum on the
frozen embeddings of one aggregation (``cls``, ``mean``, ``flattened``). The grid is every (aggregation, label
fraction, seed, learning rate); ``radstream.eval.probe_grid`` trains all of it in one pass over the cached embeddings,
each head with its own early stopping on validation accuracy; the BatchNorm evaluates with the exact statistics
of the head's training subset.

Per (aggregation, fraction, seed) the learning rate with the best validation accuracy is chosen (ties: the
smaller rate); the chosen heads are scored on the test split: top-1, balanced accuracy, per-class recall and
a confusion matrix. Outputs in RUN_DIR: ``probe_results.json`` (every head, the chosen ones, mean ± std over
seeds; ``radstream report`` reads it), ``probe_results.csv`` (every head), ``confusion_<agg>_<percent>%.png``
(chosen heads, summed over seeds), ``chosen_heads.pt`` (their weights with BatchNorm folded in),
``config.yaml`` and, unless ``knn_k=0``, ``knn_results.json`` (``radstream.eval.knn``: DINO's weighted kNN over the same
embeddings and training subsets).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from radstream.core.atomic import write_text
from radstream.eval.probe_config import ProbeConfig, ProbeData
from radstream.eval.probe_grid import Group, HeadGrid, group_epochs, predict, train_grids
from radstream.train.entry import EXIT_OK, Flag, stage_main
from radstream.train.metrics import (
    accuracy,
    balanced_accuracy,
    confusion_matrix,
    mean_std,
    per_class_recall,
    plot_confusion,
)
from radstream.train.run_layout import CONFIG, PROBE_RESULTS

logger = logging.getLogger(__name__)


def lr_grid(cfg: ProbeConfig) -> list[float]:
    """The grid's learning rates, ascending."""
    return [float(x) for x in np.geomspace(cfg.lr_min, cfg.lr_max, cfg.num_lrs)]


def load_probe_data(cfg: ProbeConfig, device: torch.device) -> ProbeData:
    """Read the train, val and test splits of the store, keeping labelled rows only.

    Raises:
        ValueError: a split without labelled rows, or an aggregation the store lacks.
    """
    from radstream.eval.embed_store import read_attrs, read_split

    attrs = read_attrs(cfg.embeddings)
    features, labels, fractions, keys = {}, {}, None, None
    for split in ("train", "val", "test"):
        part = read_split(cfg.embeddings, split, cfg.aggregations)
        keep = part.labels >= 0
        if not keep.any():
            raise ValueError(f"{cfg.embeddings}: split {split!r} has no labelled samples")
        features[split] = {a: torch.from_numpy(v[keep]).to(device) for a, v in part.features.items()}
        labels[split] = torch.from_numpy(part.labels[keep]).to(device)
        if split == "train":
            fractions, keys = part.fractions[keep], np.asarray(part.keys, dtype=object)[keep]
    class_names = list(attrs.get("class_names") or [])
    if not class_names:
        class_names = [str(i) for i in range(int(max(int(y.max()) for y in labels.values())) + 1)]
    levels = [float(f) for f in attrs["label_fractions"]]
    patients = train_patients(attrs.get("shards"), keys)
    return ProbeData(features, labels, fractions, levels, class_names, keys, patients)


def train_patients(shards: str | None, keys: np.ndarray) -> np.ndarray | None:
    """The patient id of every training key, from the samples table of the embeddings' shard dataset (None
    when it is not there, or does not hold every key)."""
    if not shards or not (Path(shards) / "samples.parquet").is_file():
        return None
    from radstream.shards.layout import load_samples

    table = load_samples(shards, "train", columns=["key", "patient_id"])
    patient_of = dict(zip(table["key"].to_pylist(), table["patient_id"].to_pylist(), strict=True))
    if not all(k in patient_of for k in keys):
        return None
    return np.asarray([patient_of[k] for k in keys], dtype=object)


def make_groups(data: ProbeData, cfg: ProbeConfig) -> list[Group]:
    """One data group per (label fraction, seed), fractions outermost; seed k trains on labelled subset k
    of the fraction (``radstream.shards.subsets``: 0 the build's, k >= 1 drawn again by patient and class), as every
    other model of seed k.

    Raises:
        ValueError: a fraction the store does not have, one without labelled training rows, or a seed >= 1
            whose subset cannot be drawn (the shard dataset is gone).
    """
    groups = []
    for fraction in cfg.label_fractions:
        match = [j for j, level in enumerate(data.levels) if abs(level - fraction) < 1e-9]
        if not match:
            raise ValueError(f"label fraction {fraction} is not in the embedding store (has {data.levels})")
        for seed in cfg.seeds:
            rows = subset_rows(data, match[0], int(seed))
            if len(rows) < 2:
                raise ValueError(
                    f"label fraction {fraction} has {len(rows)} labelled training rows; need >= 2"
                )
            groups.append(Group(float(fraction), int(seed), rows))
    return groups


def subset_rows(data: ProbeData, level: int, seed: int) -> np.ndarray:
    """The training rows of subset ``seed`` of fraction ``data.levels[level]`` (``radstream.shards.subsets``)."""
    if seed == 0 or data.levels[level] >= 1.0:
        return np.flatnonzero(data.train_fractions[:, level])
    if data.train_patients is None or data.train_keys is None:
        raise ValueError(
            f"probe seed {seed} draws its own labelled subset by patient, and the patients of the training "
            "rows are unknown (the embeddings' shard dataset is not where they were made); use seeds=[0]"
        )
    from radstream.shards.subsets import drawn_mask

    labels = data.labels["train"].cpu().numpy()
    keep = drawn_mask(data.train_keys, labels, data.train_patients, data.levels, data.levels[level], seed)
    return np.flatnonzero(keep)


def build_grids(data: ProbeData, groups: Sequence[Group], cfg: ProbeConfig) -> dict[str, HeadGrid]:
    """A freshly initialised HeadGrid per aggregation."""
    lrs, c = lr_grid(cfg), len(data.class_names)
    return {
        agg: HeadGrid(agg, x.shape[1], c, groups, lrs, cfg, x.device)
        for agg, x in data.features["train"].items()
    }


def _head_record(agg: str, group: Group, lr: float, grid: HeadGrid, s: int, i: int, cm: np.ndarray) -> dict:
    return {
        "model": f"probe_{agg}",
        "aggregation": agg,
        "fraction": group.fraction,
        "seed": group.seed,
        "lr": lr,
        "train_size": len(group.rows),
        "val_acc": float(grid.best_acc[s, i]),
        "best_epoch": int(grid.best_epoch[s, i]),
        "epochs": int(grid.epochs[s, i]),
        "capped": int(grid.epochs[s, i])
        >= group_epochs(grid.cfg, group.steps_per_epoch(grid.cfg.batch_size))[1],
        "test_acc": accuracy(cm),
        "test_balanced_acc": balanced_accuracy(cm),
    }


def score_heads(
    grids: dict[str, HeadGrid], data: ProbeData, groups: Sequence[Group], cfg: ProbeConfig
) -> dict:
    """Test metrics of every head's best weights, the chosen learning rate per (aggregation, fraction) and the
    chosen heads' weights (one per seed).

    The rate is chosen as ``radstream report`` chooses every row's: the best validation accuracy averaged
    over the seeds (ties: the smaller rate), one rate for all seeds. Choosing per seed would take a maximum
    over rates for each seed and make the mean optimistic, and the probe's summary would disagree with the
    report's table.

    Returns:
        {"heads": [record per head], "chosen": [record with per-class recall and confusion matrix],
        "weights": {"agg/fraction/seed": {"weight" [C, D], "bias" [C], "lr"}}}
    """
    lrs, names = lr_grid(cfg), data.class_names
    y = data.labels["test"].cpu().numpy()
    heads, chosen, weights = [], [], {}
    for agg, grid in grids.items():
        preds = predict(data.features["test"][agg], grid.best_weight, grid.best_bias, cfg.eval_batch_size)
        preds = preds.cpu().numpy()
        scored: dict[float, list[tuple[int, Group, list[dict], list[np.ndarray]]]] = {}
        for s, group in enumerate(groups):
            cms = [confusion_matrix(y, preds[s, i], len(names)) for i in range(len(lrs))]
            records = [_head_record(agg, group, lr, grid, s, i, cms[i]) for i, lr in enumerate(lrs)]
            heads += records
            scored.setdefault(group.fraction, []).append((s, group, records, cms))
        for runs in scored.values():
            mean_val = np.mean([[r["val_acc"] for r in records] for _, _, records, _ in runs], axis=0)
            best = int(np.argmax(mean_val))  # first maximum: the smaller rate on ties
            for s, group, records, cms in runs:
                recall = per_class_recall(cms[best])
                chosen.append({**records[best], "per_class_recall": dict(zip(names, recall, strict=True)),
                               "confusion": cms[best].tolist()})  # fmt: skip
                weights[f"{agg}/{group.fraction}/{group.seed}"] = {
                    "weight": grid.best_weight[s, :, best].T.cpu().clone(),
                    "bias": grid.best_bias[s, best].cpu().clone(),
                    "lr": lrs[best],
                }
    return {"heads": heads, "chosen": chosen, "weights": weights}


def summarize(chosen: Sequence[dict]) -> list[dict]:
    """Mean ± std over seeds of the chosen heads, per (aggregation, fraction)."""
    by_key: dict[tuple[str, float], list[dict]] = {}
    for rec in chosen:
        by_key.setdefault((rec["aggregation"], rec["fraction"]), []).append(rec)
    out = []
    for (agg, fraction), recs in by_key.items():
        acc, acc_std = mean_std([r["test_acc"] for r in recs])
        bal, bal_std = mean_std([r["test_balanced_acc"] for r in recs])
        out.append(
            {
                "model": f"probe_{agg}",
                "aggregation": agg,
                "fraction": fraction,
                "seeds": [r["seed"] for r in recs],
                "lrs": [r["lr"] for r in recs],
                "val_acc_mean": mean_std([r["val_acc"] for r in recs])[0],
                "test_acc_mean": acc,
                "test_acc_std": acc_std,
                "test_balanced_acc_mean": bal,
                "test_balanced_acc_std": bal_std,
            }
        )
    return out


def write_results(out: Path, scored: dict, data: ProbeData, cfg: ProbeConfig, steps: int) -> dict:
    """probe_results.json/.csv, confusion PNGs (chosen heads summed over seeds), chosen_heads.pt, config.yaml."""
    from radstream.core.config import to_dict, to_yaml
    from radstream.eval.embed_store import read_attrs
    from radstream.train.provenance import mae_provenance

    out.mkdir(parents=True, exist_ok=True)
    attrs = read_attrs(cfg.embeddings)
    results = {
        "kind": "probe",
        "embeddings": str(Path(cfg.embeddings).resolve()),
        "checkpoint": attrs.get("checkpoint"),
        "aggregation_labels": attrs.get("aggregation_labels", {}),
        **mae_provenance(attrs),
        "class_names": data.class_names,
        "lrs": lr_grid(cfg),
        "steps": steps,
        "config": to_dict(cfg),
        "summary": summarize(scored["chosen"]),
        "chosen": scored["chosen"],
        "heads": scored["heads"],
    }
    write_text(out / PROBE_RESULTS, json.dumps(results, indent=1))
    fields = list(scored["heads"][0])
    lines = [",".join(fields)] + [",".join(str(h[f]) for f in fields) for h in scored["heads"]]
    write_text(out / "probe_results.csv", "\n".join(lines) + "\n")
    totals: dict[tuple[str, float], np.ndarray] = {}
    for rec in scored["chosen"]:
        key = (rec["aggregation"], rec["fraction"])
        totals[key] = totals.get(key, 0) + np.asarray(rec["confusion"])
    for (agg, fraction), cm in totals.items():
        title = f"probe {agg}, {fraction:.0%} of labels: test acc {accuracy(cm):.3f} (seeds summed)"
        plot_confusion(cm, data.class_names, out / f"confusion_{agg}_{fraction:.0%}.png", title)
    torch.save(scored["weights"], out / "chosen_heads.pt")
    write_text(out / CONFIG, to_yaml(cfg))
    return results


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: ProbeConfig, progress: bool = True) -> dict:
    """Train and score the whole grid over ``cfg.embeddings``; writes the results into ``cfg.out``."""
    device = _device(cfg.device)
    data = load_probe_data(cfg, device)
    groups = make_groups(data, cfg)
    grids = build_grids(data, groups, cfg)
    n_heads = sum(g.weight.shape[0] * g.weight.shape[2] for g in grids.values())
    logger.info("probe: %d heads (%d data groups) on %s", n_heads, len(groups), device)
    steps = train_grids(grids, data, groups, cfg, progress=progress)
    results = write_results(Path(cfg.out), score_heads(grids, data, groups, cfg), data, cfg, steps)
    for row in results["summary"]:
        logger.info(
            "probe %-9s fraction %-5g test top-1 %.4f ± %.4f (lrs %s)",
            row["aggregation"],
            row["fraction"],
            row["test_acc_mean"],
            row["test_acc_std"],
            row["lrs"],
        )
    if cfg.knn_k:
        _run_knn(cfg, data, groups)
    return results


def _run_knn(cfg: ProbeConfig, data: ProbeData, groups: Sequence[Group]) -> None:
    """The kNN evaluation over the same embeddings and training subsets, to ``knn_results.json``."""
    from radstream.eval.embed_store import read_attrs
    from radstream.eval.knn import evaluate_knn, write_knn_results
    from radstream.train.provenance import mae_provenance

    subsets = {(g.fraction, g.seed): g.rows for g in groups}
    records = evaluate_knn(data, cfg.aggregations, subsets, cfg.knn_k, cfg.knn_temperature)
    attrs = read_attrs(cfg.embeddings)
    write_knn_results(
        cfg.out, records, cfg.embeddings, attrs.get("aggregation_labels", {}), mae_provenance(attrs)
    )
    for rec in records:
        logger.info("knn   %-9s fraction %-5g seed %d test top-1 %.4f (k %d)", rec["aggregation"],
                    rec["fraction"], rec["seed"], rec["test_acc"], rec["k"])  # fmt: skip


FLAGS = (
    Flag("--embeddings", "embeddings", "zarr store from radstream.eval.embed", required=True),
    Flag("--out", "out", "run folder for the results", required=True),
)
"""The command line's own flags (as README.md, radstream demo and slurm/probe.sbatch use them)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m radstream.eval.probe --embeddings EMB.zarr --out RUN_DIR [key=value ...]``."""
    return stage_main(
        argv,
        prog="radstream.eval.probe",
        description="linear probes over cached embeddings",
        config_cls=ProbeConfig,
        run=_run_stage,
        example_recipe="configs/probe/default.yaml",
        example_override="seeds=[0] max_epochs=50",
        flags=FLAGS,
    )


def _run_stage(cfg: ProbeConfig) -> int:
    run(cfg)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""k-nearest-neighbour evaluation of frozen embeddings, as DINO reports it: no training, seconds, and a check on
the linear probes.

Every query (a val or test embedding) is compared with the labelled training rows of one label fraction by
cosine similarity; its ``k`` most similar rows vote for their class with weight ``exp(similarity /
temperature)`` (DINO: k = 20, temperature 0.07), and the class with the largest vote is the prediction.
``radstream.eval.probe`` runs it over the same zarr embeddings (``knn_k``, ``knn_temperature``) and writes
``knn_results.json`` beside ``probe_results.json``; ``radstream report`` shows a kNN row per aggregation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from radstream.core.atomic import write_text
from radstream.eval.probe_config import ProbeData
from radstream.train.run_layout import KNN_RESULTS

RESULTS_FILE = KNN_RESULTS


def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class predictions.

    Args:
        train_x: [N, D] labelled embeddings. train_y: [N] int64 labels in [0, num_classes).
        query_x: [Q, D] embeddings to classify.
        num_classes: C.
        k: neighbours per query (all N when N < k).
        temperature: votes weigh ``exp(cosine / temperature)``.
        chunk: queries scored at a time (a [chunk, N] similarity matrix).

    Returns:
        [Q] int64 predicted classes.
    """
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for lo in range(0, query_x.shape[0], chunk):
        sim = F.normalize(query_x[lo : lo + chunk].float(), dim=1) @ bank.T  # [q, N]
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=query_x.device)


def evaluate_knn(
    data: ProbeData,
    aggregations: Sequence[str],
    subsets: Mapping[tuple[float, int], np.ndarray],
    k: int,
    temperature: float,
) -> list[dict]:
    """Validation and test accuracy of the kNN per (aggregation, label fraction, seed).

    Args:
        data: the embeddings. aggregations: which of them.
        subsets: (label fraction, seed) -> the labelled training rows of that seed's subset (the bank; the
            probe heads' training subset of that seed).
        k, temperature: as ``knn_predict``.
    """
    num_classes = len(data.class_names)
    records = []
    for agg in aggregations:
        for (fraction, seed), rows in subsets.items():
            index = torch.from_numpy(np.asarray(rows)).to(data.labels["train"].device)
            bank_x, bank_y = data.features["train"][agg][index], data.labels["train"][index]
            acc = {}
            for split in ("val", "test"):
                pred = knn_predict(bank_x, bank_y, data.features[split][agg], num_classes, k, temperature)
                acc[split] = float((pred == data.labels[split]).double().mean())
            records.append({
                "model": f"knn_{agg}", "aggregation": agg, "fraction": fraction, "seed": seed, "k": k,
                "temperature": temperature, "train_rows": len(index), "val_acc": acc["val"],
                "test_acc": acc["test"],
            })  # fmt: skip
    return records


def write_knn_results(
    out: str | Path,
    records: list[dict],
    embeddings: str,
    labels: dict[str, str],
    provenance: dict | None = None,
) -> Path:
    """``out/knn_results.json``: kind "knn", the embeddings it read, the aggregations' names, the encoder's
    ``architecture`` and ``init`` (``radstream.train.provenance.mae_provenance``), the records."""
    path = Path(out) / RESULTS_FILE
    results = {"kind": "knn", "embeddings": str(Path(embeddings).resolve()), "aggregation_labels": labels,
               **(provenance or {}), "results": records}  # fmt: skip
    write_text(path, json.dumps(results, indent=1))
    return path

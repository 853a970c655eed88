"""The streaming loader's entry point: a shard dataset → the loader of one rank (DALI or torch backend).

What a batch holds, the padding, augmentation and resume rules: ``radstream.shards.loader_base``. Where the shards
come from (a local folder or a remote store with its node cache): ``radstream.shards.remote``.
"""

from __future__ import annotations

import os

import torch

from radstream.shards.integrity import check_samples_table, check_shards
from radstream.shards.loader_base import ShardLoader
from radstream.shards.loader_config import LoaderConfig
from radstream.shards.loader_data import load_split
from radstream.shards.remote import resolve_dataset

__all__ = ["ShardLoader", "build_loader", "dali_available"]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports here."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    cfg: LoaderConfig,
    root: str | os.PathLike[str],
    split: str,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    device: str | torch.device = "cpu",
    train: bool = True,
    run_seed: int = 0,
) -> ShardLoader:
    """The loader of one rank for one split of a shard dataset.

    Args:
        cfg: loader settings.
        root: the shard dataset folder.
        split: ``train``, ``val`` or ``test``.
        process_index: this rank (``accelerator.process_index``).
        num_processes: the world size (``accelerator.num_processes``).
        device: where batches go (``accelerator.device``); a CUDA device makes DALI decode on that GPU.
        train: augment and, with ``cfg.strict``, drop incomplete batches; False: stored pixels, every sample.
        run_seed: the training run's seed, used when ``cfg.seed`` is None (0 outside a run).

    Raises:
        ValueError: no samples, or ``backend="dali"`` without ``nvidia.dali``.
        DatasetError: with ``cfg.verify``, a local shard or the samples table differs from the manifest.
    """
    backend = cfg.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    elif backend == "dali" and not dali_available():
        raise ValueError(
            "loader.backend=dali but nvidia.dali does not import; install nvidia-dali or use torch"
        )
    cfg = cfg.for_run(run_seed)
    fraction = cfg.label_fraction if split == "train" else None
    root, store = resolve_dataset(root, cfg.remote)
    if cfg.verify:
        check_samples_table(root, store.manifest, store.url if store.remote else None)
    subset = cfg.label_subset if cfg.label_subset is not None else run_seed
    data = load_split(root, split, fraction, subset, cfg.remote.cache_dir)
    if cfg.verify and not store.remote:  # a remote store verifies each shard as it downloads it
        check_shards(root, data.shards, store.manifest, cfg.remote.cache_dir)
    kwargs = {
        "process_index": process_index,
        "num_processes": num_processes,
        "device": device,
        "train": train,
        "store": store,
    }
    if backend == "dali":
        from radstream.shards.dali_backend import DaliLoader

        return DaliLoader(data, cfg, **kwargs)
    from radstream.shards.torch_backend import TorchLoader

    return TorchLoader(data, cfg, **kwargs)

"""Writing the checkpoints of a run: ``run_dir/checkpoints/step-N/`` plus a ``latest`` file naming the newest
(``radstream.train.run_layout`` finds them).

A checkpoint holds Accelerate's state (model, optimizer, grad scaler, the accelerator's step counter and the
RNG states of python, numpy, torch and cuda, one file per rank), ``loop_state.json`` (epoch, step, loader
position, early stopping) and the resolved ``config.yaml``.

Never half written: every rank writes into ``checkpoints/.tmp-step-N``; after a barrier the main process
fsyncs the files and renames the folder to ``step-N``, then replaces ``latest`` (write a temp file, fsync,
rename). A crash at any point leaves the previous ``latest`` and its folder intact; a leftover ``.tmp-*``
folder is ignored and removed by the next save. Only then are checkpoints beyond the last ``keep_last``
deleted. The run directory must be on storage every rank sees (one node, or a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import OmegaConf

from radstream.train.mae import MAE, MAEConfig
from radstream.train.run_layout import (
    CONFIG,
    LATEST,
    LOOP_STATE,
    META,
    WEIGHTS,
    checkpoints_dir,
    list_checkpoints,
    resolve_weights,
)
from radstream.train.weights import load_init

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: str | os.PathLike[str],
    step: int,
    loop_state: dict,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and point ``latest`` at it. Every rank must call it.

    Args:
        accelerator: the run's accelerator (its prepared model and optimizer are saved).
        run_dir: the run directory.
        step: optimizer steps done.
        loop_state: JSON-friendly loop state (epoch, loader position, early stopping, ...).
        config_yaml: the resolved config.
        keep_last: complete checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"step-{step}", root / f"{_TMP_PREFIX}step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / LOOP_STATE).write_text(json.dumps({"step": step, **loop_state}, indent=1))
        (tmp / CONFIG).write_text(config_yaml)
    accelerator.wait_for_everyone()  # every rank's RNG state is in tmp
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
        _write_pointer(root, final.name)
        _prune(run_dir, keep_last, keep=final)
        logger.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike[str]) -> dict:
    """Restore Accelerate's state from ``path`` on every rank; returns the loop state saved with it.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    path = Path(path)
    if not (path / LOOP_STATE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {LOOP_STATE})")
    accelerator.load_state(str(path))
    return json.loads((path / LOOP_STATE).read_text())


def save_weights(
    accelerator: Accelerator, model: torch.nn.Module, folder: str | os.PathLike[str], meta: dict
) -> Path:
    """Write the model's full state dict as ``folder/model.safetensors`` plus ``meta.json``, atomically (a temp
    folder renamed into place). Every rank must call it (FSDP gathers the weights)."""
    final = Path(folder)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_model(model, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps(meta))
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_weights(accelerator: Accelerator, model: torch.nn.Module, folder: str | os.PathLike[str]) -> bool:
    """Load ``folder/model.safetensors`` (from ``save_weights``) into the model; False when there is none or
    the model is sharded by FSDP (a full state dict does not load into it here)."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        logger.warning("FSDP: %s not loaded (a full state dict does not load into a sharded model)", path)
        return False
    from safetensors.torch import load_file

    accelerator.unwrap_model(model).load_state_dict(load_file(str(path)))
    return True


def _remove_stale_tmp(root: Path) -> None:
    """Delete temp folders of saves that never finished (a crash or a kill during a save)."""
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            logger.warning("removing unfinished checkpoint %s", p)
            shutil.rmtree(p)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk before it is renamed into place."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is moved aside first."""
    old = None
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}old-{final.name}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _write_pointer(root: Path, name: str) -> None:
    """Atomically make ``root/latest`` contain ``name``."""
    tmp = root / f"{_TMP_PREFIX}{LATEST}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _prune(run_dir: str | os.PathLike[str], keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints older than the last ``keep_last`` (never ``keep``)."""
    complete = list_checkpoints(run_dir)
    for p in complete[: max(len(complete) - keep_last, 0)]:
        if p != keep:
            shutil.rmtree(p)


_WEIGHT_FILES = (WEIGHTS, "pytorch_model.bin", "model.pt", "model.pth")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """The weights folder ``path`` names (``radstream.train.run_layout.resolve_weights``: a run folder's best weights,
    else its latest checkpoint; ``RUN/best``, a ``step-N`` folder or the ``latest`` pointer as named) and the
    config.yaml that describes its model.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
    """
    path = resolve_weights(path).folder
    config = next((c for c in (path / CONFIG, path.parent / CONFIG) if c.is_file()), None)
    if not path.is_dir() or config is None:
        raise FileNotFoundError(f"{path}: not a checkpoint folder (need model weights and a {CONFIG})")
    return path, config


def load_encoder(checkpoint: str | Path) -> tuple[MAE, dict, Path]:
    """The MAE of a pretraining checkpoint, weights loaded, in eval mode.

    Returns:
        (model, the checkpoint's resolved config as a dict, the weights folder).

    Raises:
        FileNotFoundError: no checkpoint folder or no weights file in it.
    """
    folder, config_path = resolve_checkpoint(checkpoint)
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{config_path}: no 'model' section (not a pretraining config)")
    model_cfg = MAEConfig(**{**config["model"], "init": None})  # the checkpoint's weights replace any init
    weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no model weights ({', '.join(_WEIGHT_FILES)})")
    model = MAE(model_cfg)
    load_init(model, weights)
    return model.eval(), config, folder

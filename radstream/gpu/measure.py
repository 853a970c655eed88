"""How the training-step benchmarks set up and measure: the trainer's optimizer and ``accelerator.prepare``,
device sync, a timed run, the FLOPs of one step, peak memory.

One copy for ``radstream gpu-check`` (``radstream.gpu.mae``, ``radstream.gpu.bench``) and
``benchmarks/train_step.py``; peak memory is the trainer's own (``radstream.train.steps.peak_memory_mb``, the
figure of metrics.jsonl).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from radstream.train.config import OptimConfig
from radstream.train.optim import build_optimizer
from radstream.train.steps import peak_memory_mb


def prepare_for_training(
    accelerator, model: torch.nn.Module, groups: list[dict], optim: OptimConfig, images_per_step: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and AdamW as the trainer's setup makes them: ``build_optimizer`` over the task's parameter
    ``groups`` at ``optim``'s peak rate for ``images_per_step``, fused on CUDA, then ``accelerator.prepare``."""
    cuda = accelerator.device.type == "cuda"
    optimizer = build_optimizer(groups, optim.betas, optim.peak_lr(images_per_step), fused=cuda)
    return accelerator.prepare(model, optimizer)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings start and end on a quiet device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[int], object], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step(i)`` after ``warmup`` untimed ones (compilation, the allocator,
    cuDNN autotuning), between two device synchronisations."""
    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    return time.perf_counter() - start


def step_flops(step: Callable[[], object]) -> float:
    """FLOPs of one eager ``step()``: matrix products, convolutions and attention, forward and backward
    (``torch.utils.flop_counter``), the usual numerator of MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (the CPU's peak resident set size cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The trainer's peak memory in GiB: CUDA max allocated since the last reset, else the process's peak RSS."""
    return peak_memory_mb(device) / 1024

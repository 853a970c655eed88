"""The ``mae`` part of ``radstream gpu-check``: the training step itself, timed on the GPU.

What is timed is what trains: the model, parameter groups and AdamW of ``radstream.train.pretrain.MAETask``
from the ViT-B/16 recipe (``configs/pretrain/vit_b16_224.yaml``: decoder 8x512, mask 0.75, bf16 through the
run's accelerator, ``radstream.train.steps.build_accelerator``), prepared by Accelerate as the trainer
prepares it, and each step is ``radstream.train.mae_step.train_step`` with the recipe's seed and gradient
clipping, as ``MAETask.step`` calls it (masks from ``step_noise``, border-aware background from the batch's
foreground boxes). Compiled modes compile as a run does (``radstream.train.steps.dynamo_plugin``: static
shapes, one graph per bin). Batches are made on the device beforehand (no loading: the ``e2e`` part measures
the loader).

Modes: fixed 224 eager and compiled; smart bins + border-aware masking, eager (and compiled in full mode).
Each row: images/s, tokens/s, foreground tokens/s, FLOPs per image (``radstream.gpu.measure.step_flops`` over
one eager step per batch), MFU, the attention kernel (from a profiled step), peak memory, dynamo's graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from radstream.core.config import load_config
from radstream.gpu.measure import (
    peak_memory_gib,
    prepare_for_training,
    reset_peak_memory,
    step_flops,
    sync,
    timed,
)
from radstream.gpu.report import mfu, save
from radstream.train import mae_step
from radstream.train.config import PretrainConfig
from radstream.train.mae import background_patches
from radstream.train.mae_step import MAEStepStats
from radstream.train.pretrain import MAETask
from radstream.train.steps import allow_graphs, build_accelerator, dynamo_plugin

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "vit_b16_224.yaml"
PATCH = 16
BORDER_THRESHOLD = 0.02
SMART_BINS = ((224, 224), (192, 256), (256, 192), (160, 304))
"""Bin shapes of at most 196 patches (196, 192, 192, 190), as smart binning plans for radiographs."""
_ATTENTION = (  # (backend, name fragments of its aten op or kernels), checked in this order
    ("cudnn", ("_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa")),
    ("flash", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd", "flash_attn")),
    ("memory-efficient", ("_scaled_dot_product_efficient_attention", "fmha_cutlass", "efficient_attention")),
)


@dataclass(frozen=True)
class MaeSize:
    """How big the MAE measurement is."""

    batch: int
    """Images per step in the 196-patch bins (smart bins get the same tokens per step)."""
    steps: int
    """Timed steps per mode."""
    compiled_smart: bool
    """Also time smart bins + border-aware masking compiled (one static graph per bin: a compile each)."""
    overrides: tuple[str, ...] = ()
    """``key=value`` overrides of the recipe (the CPU tests shrink the model, run on the CPU without bf16 and
    compile with the "eager" backend: dynamo without code generation)."""


MAE_FULL = MaeSize(batch=256, steps=20, compiled_smart=True)
MAE_QUICK = MaeSize(batch=64, steps=5, compiled_smart=False)


def attention_backend(names: Iterable[str]) -> str:
    """Which SDPA implementation ran, from the op and kernel names of a profiled step; ``math`` when no
    fused attention op or kernel appears (the softmax(QK^T)V composition)."""
    lowered = [n.lower() for n in names]
    for backend, fragments in _ATTENTION:
        if any(f in n for n in lowered for f in fragments):
            return backend
    return "math"


def top_kernels(times: Iterable[tuple[str, float, int]], n: int = 15) -> list[dict]:
    """The ``n`` kernels with the most GPU time, from (name, microseconds, calls); with their share."""
    rows = sorted(times, key=lambda t: -t[1])
    total = sum(t[1] for t in rows) or 1.0
    return [{"name": k, "gpu_ms": us / 1e3, "calls": c, "share": us / total} for k, us, c in rows[:n]]


def profile_step(step: Callable[[], object]) -> tuple[list[str], list[tuple[str, float, int]]]:
    """(op and kernel names, per-kernel (name, GPU µs, calls)) of one profiled ``step()``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        sync(torch.device("cuda" if cuda else "cpu"))
    events = prof.key_averages()
    kernels = [
        (e.key, float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)), e.count)
        for e in events
        if e.device_type == DeviceType.CUDA
    ]  # fmt: skip
    return [e.key for e in events], [k for k in kernels if k[1] > 0]


def synthetic_batch(n: int, height: int, width: int, *, border: bool, gen: torch.Generator) -> dict:
    """A device batch as the loader delivers it (image, foreground box, valid, key) of random images in
    [0.1, 0.9]; with ``border``, black outside a random foreground box of 55-95% of each side. Float images
    pass ``unit_float`` as they are. ``foreground_patches``: its patches outside the background rule."""
    dev = gen.device
    images = torch.rand(n, 1, height, width, device=dev, generator=gen) * 0.8 + 0.1
    boxes = torch.tensor([[0, 0, height, width]], device=dev).repeat(n, 1)
    if border:
        side = torch.tensor([height, width], device=dev)
        size = (torch.rand(n, 2, device=dev, generator=gen) * 0.4 + 0.55) * side
        corner = torch.rand(n, 2, device=dev, generator=gen) * (side - size)
        boxes = torch.cat([corner, corner + size], 1).long()
        ys, xs = torch.arange(height, device=dev), torch.arange(width, device=dev)
        inside_y = (ys[None] >= boxes[:, :1]) & (ys[None] < boxes[:, 2:3])
        inside_x = (xs[None] >= boxes[:, 1:2]) & (xs[None] < boxes[:, 3:4])
        images = images * (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    background = background_patches(images, PATCH, BORDER_THRESHOLD, boxes=boxes)
    return {"image": images, "foreground": boxes, "valid": torch.ones(n, dtype=torch.bool, device=dev),
            "key": [f"{height}x{width}/{i}" for i in range(n)],
            "foreground_patches": int((~background).sum()) if border else None}  # fmt: skip


def recipe(size: MaeSize, border_aware: bool) -> PretrainConfig:
    """The ViT-B/16 recipe with ``size``'s overrides; border-aware masking on or off."""
    mode = [f"model.border_aware={str(border_aware).lower()}", f"model.border_threshold={BORDER_THRESHOLD}"]
    overrides = ["shards=.", "run_dir=.", "run.tensorboard=false", *mode, *size.overrides]
    return load_config(PretrainConfig, RECIPE, overrides)


@dataclass
class TrainingStep:
    """Optimizer steps on the model and AdamW the trainer builds for ``cfg`` (seeded, ``MAETask``'s parameter
    groups, fused on CUDA, ``accelerator.prepare``), each ``radstream.train.mae_step.train_step`` as
    ``MAETask.step`` calls it. ``self(i)``: step ``i`` on ``batches[i % len]``."""

    accelerator: Accelerator
    cfg: PretrainConfig
    batches: list[dict]
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        cfg, task = self.cfg, MAETask(self.cfg)
        set_seed(cfg.run.seed)
        model = task.build_model()
        images = len(self.batches[0]["key"])
        self.model, self.optimizer = prepare_for_training(
            self.accelerator, model, task.param_groups(model), cfg.optim, images
        )

    def compile(self) -> None:
        """Compile the model as a run with ``run.compile`` does (Accelerate's prepare with the run's
        ``dynamo_plugin``)."""
        allow_graphs(2 * len({b["image"].shape for b in self.batches}))
        plugin = dynamo_plugin(replace(self.cfg.run, compile=True))
        self.model = torch.compile(self.model, **plugin.to_kwargs())

    def __call__(self, i: int) -> MAEStepStats:
        cfg = self.cfg
        return mae_step.train_step(self.accelerator, self.model, self.optimizer, [self.batches[i % len(self.batches)]],
                                   seed=cfg.run.seed, step=i, grad_clip=cfg.optim.grad_clip)  # fmt: skip


def mae_mode(
    name: str, accelerator: Accelerator, cfg: PretrainConfig, batches: list[dict], *, compiled: bool,
    steps: int, peak: float | None,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """One row of the MAE table: throughput, FLOPs, MFU, attention kernel, peak memory (and the profile)."""
    from torch._dynamo.utils import counters

    device = accelerator.device
    step = TrainingStep(accelerator, cfg, batches)
    flops = sum(step_flops(lambda j=j: step(j)) for j in range(len(batches)))  # one eager step per batch
    counters.clear()
    if compiled:
        step.compile()
    reset_peak_memory(device)
    seconds = timed(step, 2 * len(batches), steps, device)
    names, kernels = profile_step(lambda: step(0))
    timed_batches = [batches[i % len(batches)] for i in range(steps)]
    images = sum(len(b["key"]) for b in timed_batches)
    per_image = flops / sum(len(b["key"]) for b in batches)
    patches = sum(b["image"][0, 0].numel() // PATCH**2 * len(b["key"]) for b in timed_batches)
    border = cfg.model.border_aware
    foreground = sum(b["foreground_patches"] for b in timed_batches) if border else None
    row = {
        "mode": name, "batch": len(batches[0]["key"]), "steps": steps, "seconds": seconds,
        "images_per_s": images / seconds, "tokens_per_s": patches / seconds,
        "foreground_tokens_per_s": foreground / seconds if border else None,
        "gflops_per_image": per_image / 1e9, "mfu": mfu(per_image, images / seconds, peak),
        "attention": attention_backend(names), "peak_mem_gib": peak_memory_gib(device),
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
    }  # fmt: skip
    accelerator.free_memory(step.model, step.optimizer)
    return row, top_kernels(kernels)


def run_mae(out: Path, size: MaeSize, peak: float | None) -> None:
    """Eager, compiled, smart bins + border-aware (eager, and compiled when ``size`` says so), into ``out``
    after every row."""
    fixed_cfg, smart_cfg = recipe(size, border_aware=False), recipe(size, border_aware=True)
    accelerator = build_accelerator(fixed_cfg.run, fixed_cfg.run_dir)
    device = accelerator.device
    gen = torch.Generator(device).manual_seed(0)
    fixed = [synthetic_batch(size.batch, 224, 224, border=False, gen=gen) for _ in range(2)]
    smart = [synthetic_batch(max(1, size.batch * 196 // (h * w // PATCH**2)), h, w, border=True, gen=gen)
             for h, w in SMART_BINS]  # fmt: skip
    modes = [("fixed 224, eager", fixed_cfg, fixed, False), ("fixed 224, compiled", fixed_cfg, fixed, True),
             ("smart bins + border-aware, eager", smart_cfg, smart, False)]  # fmt: skip
    if size.compiled_smart:
        modes.append(("smart bins + border-aware, compiled", smart_cfg, smart, True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"rows": [], "peak_tflops": peak, "device": name, "recipe": RECIPE.name,
              "precision": fixed_cfg.run.mixed_precision}  # fmt: skip
    for mode, cfg, batches, compiled in modes:
        row, kernels = mae_mode(
            mode, accelerator, cfg, batches, compiled=compiled, steps=size.steps, peak=peak
        )
        result["rows"].append(row)
        if mode == "fixed 224, compiled":
            result["profile"] = kernels
        save(out, result)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

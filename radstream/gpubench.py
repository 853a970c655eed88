"""The measurements of ``radstream gpu-check``, one part per process: ``python -m radstream.gpubench PART``.

Parts: ``mae`` (MAE ViT-B/16 at 224, mask 0.75, decoder 8x512, bf16 autocast, fused AdamW: images/s, MFU,
the attention kernel, peak memory; eager and compiled; and smart bins + border-aware masking), ``resnet``
(ResNet50, channels-last, bf16), ``decode`` and ``e2e`` (in ``radstream.gpubench_data``). Each writes its JSON
result after every row, so a part stopped at its time limit still reports what it finished.

Timing: a few warm-up steps (compilation, allocator, cuDNN autotuning), then a timed run between two device
synchronisations. FLOPs come from ``torch.utils.flop_counter`` over one eager step of the same batch
(matrix products and attention, forward and backward), the usual numerator of MFU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from radstream.gpureport import mfu, peak_tflops, save

PATCH = 16
BORDER_THRESHOLD = 0.02
SMART_BINS = ((224, 224), (192, 256), (256, 192), (160, 304))
"""Bin shapes of at most 196 patches (196, 192, 192, 190), as smart binning plans for radiographs."""
_ATTENTION = (  # (backend, name fragments of its aten op or kernels), checked in this order
    ("cudnn", ("_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa")),
    ("flash", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd", "flash_attn")),
    ("memory-efficient", ("_scaled_dot_product_efficient_attention", "fmha_cutlass", "efficient_attention")),
)


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


@dataclass
class Batch:
    """One device batch of a bin: images, foreground boxes, masking noise, background patches."""

    images: torch.Tensor
    boxes: torch.Tensor
    noise: torch.Tensor
    background: torch.Tensor | None


def synthetic_batch(n: int, height: int, width: int, *, border: bool, gen: torch.Generator) -> Batch:
    """Random images in [0.1, 0.9]; with ``border``, black outside a random foreground box of 55-95%."""
    dev = gen.device
    images = torch.rand(n, 1, height, width, device=dev, generator=gen) * 0.8 + 0.1
    boxes = torch.tensor([[0, 0, height, width]], device=dev).repeat(n, 1)
    if border:
        size = (torch.rand(n, 2, device=dev, generator=gen) * 0.4 + 0.55) * torch.tensor(
            [height, width], device=dev
        )
        corner = torch.rand(n, 2, device=dev, generator=gen) * (
            torch.tensor([height, width], device=dev) - size
        )
        boxes = torch.cat([corner, corner + size], 1).long()
        ys, xs = torch.arange(height, device=dev), torch.arange(width, device=dev)
        inside_y = (ys[None] >= boxes[:, :1]) & (ys[None] < boxes[:, 2:3])
        inside_x = (xs[None] >= boxes[:, 1:2]) & (xs[None] < boxes[:, 3:4])
        images = images * (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    length = height * width // PATCH**2
    noise = torch.rand(n, length, device=dev, generator=gen)
    background = None
    if border:
        from radstream.train.mae import background_patches

        background = background_patches(images, PATCH, BORDER_THRESHOLD, boxes=boxes)
    return Batch(images, boxes, noise, background)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mae_step(model: Callable, optimizer: torch.optim.Optimizer, b: Batch) -> None:
    """One optimizer step: bf16 autocast forward, backward, fused AdamW."""
    with torch.autocast(b.images.device.type, dtype=torch.bfloat16):
        loss = model(b.images, background=b.background, noise=b.noise).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(step: Callable[[int], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step(i)`` after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    return time.perf_counter() - start


def step_flops(step: Callable[[], None]) -> float:
    """FLOPs (matrix products, convolutions, attention) of one eager ``step()``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def profile_step(step: Callable[[], None]) -> tuple[list[str], list[tuple[str, float, int]]]:
    """(op and kernel names, per-kernel (name, GPU µs, calls)) of one profiled ``step()``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [
        (e.key, float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)), e.count)
        for e in events
        if e.device_type == DeviceType.CUDA
    ]  # fmt: skip
    return [e.key for e in events], [k for k in kernels if k[1] > 0]


@dataclass(frozen=True)
class MaeSize:
    """How big the MAE measurement is."""

    batch: int
    """Images per step in the 196-patch bins (smart bins get the same tokens per step)."""
    steps: int
    """Timed steps per mode."""
    compiled_smart: bool
    """Also time smart bins + border-aware masking compiled (one static graph per bin: a compile each)."""
    model: dict = field(default_factory=dict)
    """MAEConfig overrides (the CPU tests shrink the model)."""
    compile_backend: str = "inductor"
    """torch.compile's backend (the CPU tests use "eager": dynamo without code generation)."""


MAE_FULL = MaeSize(batch=256, steps=20, compiled_smart=True)
MAE_QUICK = MaeSize(batch=64, steps=5, compiled_smart=False)
VIT_B16_MAE = {"encoder": "vit_base_patch16_224", "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}


def mae_model(border_aware: bool, overrides: dict, device: torch.device):
    """The benchmark's MAE (ViT-B/16, decoder 8x512, mask 0.75 unless overridden) and its fused AdamW."""
    from radstream.train.mae import MAEConfig, build_mae

    torch.manual_seed(0)
    cfg = MAEConfig(**{**VIT_B16_MAE, "mask_ratio": 0.75, "border_aware": border_aware,
                       "border_threshold": BORDER_THRESHOLD, **overrides})  # fmt: skip
    model = build_mae(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def mae_mode(
    name: str, batches: list[Batch], *, compiled: bool, size: MaeSize, peak: float | None
) -> tuple[dict, list[dict]]:
    """One row of the MAE table: throughput, FLOPs, MFU, attention kernel, peak memory (and the profile)."""
    from torch._dynamo.utils import counters

    from radstream.train.steps import allow_graphs

    device, steps = batches[0].images.device, size.steps
    border = batches[0].background is not None
    model, optimizer = mae_model(border, size.model, device)
    flops = sum(step_flops(lambda b=b: mae_step(model, optimizer, b)) for b in batches) / len(batches)
    counters.clear()
    allow_graphs(len(batches))
    # as a run compiles (radstream.train.steps.dynamo_plugin): static shapes, one graph per bin
    run = torch.compile(model, backend=size.compile_backend, dynamic=False) if compiled else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(
        lambda i: mae_step(run, optimizer, batches[i % len(batches)]), 2 * len(batches), steps, device
    )
    names, kernels = profile_step(lambda: mae_step(run, optimizer, batches[0]))
    timed_batches = [batches[i % len(batches)] for i in range(steps)]
    images = sum(len(b.images) for b in timed_batches)
    per_image = flops * len(batches) / sum(len(b.images) for b in batches)
    patches = sum(b.images[0, 0].numel() // PATCH**2 * len(b.images) for b in timed_batches)
    foreground = sum(int((~b.background).sum()) for b in timed_batches) if border else None
    row = {
        "mode": name, "batch": len(batches[0].images), "steps": steps, "seconds": seconds,
        "images_per_s": images / seconds, "tokens_per_s": patches / seconds,
        "foreground_tokens_per_s": foreground / seconds if border else None,
        "gflops_per_image": per_image / 1e9, "mfu": mfu(per_image, images / seconds, peak),
        "attention": attention_backend(names), "peak_mem_gib": peak_memory_gib(device),
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
    }  # fmt: skip
    return row, top_kernels(kernels)


def run_mae(out: Path, size: MaeSize, peak: float | None, device: torch.device) -> None:
    """Eager, compiled, smart bins + border-aware (eager, and compiled when ``size`` says so)."""
    gen = torch.Generator(device).manual_seed(0)
    fixed = [synthetic_batch(size.batch, 224, 224, border=False, gen=gen) for _ in range(2)]
    smart = [synthetic_batch(max(1, size.batch * 196 // (h * w // PATCH**2)), h, w, border=True, gen=gen)
             for h, w in SMART_BINS]  # fmt: skip
    modes = [("fixed 224, eager", fixed, False), ("fixed 224, compiled", fixed, True),
             ("smart bins + border-aware, eager", smart, False)]  # fmt: skip
    if size.compiled_smart:
        modes.append(("smart bins + border-aware, compiled", smart, True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"rows": [], "peak_tflops": peak, "device": name}
    for mode, batches, compiled in modes:
        row, kernels = mae_mode(mode, batches, compiled=compiled, size=size, peak=peak)
        result["rows"].append(row)
        if mode == "fixed 224, compiled":
            result["profile"] = kernels
        save(out, result)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_resnet(out: Path, quick: bool) -> None:
    import timm

    batch = 64 if quick else 256
    torch.manual_seed(0)
    model = (
        timm.create_model("resnet50", in_chans=1, num_classes=8).cuda().to(memory_format=torch.channels_last)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.rand(batch, 1, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,), device="cuda")

    def step(_: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()
    steps = 5 if quick else 15
    seconds = timed(step, 3, steps, torch.device("cuda"))
    save(out, {"batch": batch, "steps": steps, "images_per_s": batch * steps / seconds,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["mae", "resnet", "decode", "e2e"])
    p.add_argument("--out", required=True, help="the part's JSON result")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--limit-s", type=float, default=600.0, help="the part's time limit (e2e stops training)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.limit_s - 5.0
    out = Path(args.out)
    if not torch.cuda.is_available():
        save(out, {"skipped": "no CUDA device"})
        return 0
    peak = peak_tflops(torch.cuda.get_device_name(), args.peak_tflops)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.part in ("decode", "e2e"):
        from radstream import gpubench_data

        return gpubench_data.run(args.part, out, args.quick, deadline)
    if args.part == "mae":
        run_mae(out, MAE_QUICK if args.quick else MAE_FULL, peak, torch.device("cuda"))
    else:
        run_resnet(out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

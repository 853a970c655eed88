"""The data parts of ``radstream gpu-check``: DALI "mixed" decode throughput, and pretraining end to end.

- ``decode``: images/s of ``fn.decoders.image(device="mixed")`` per codec (jpg, png16, jp2) at bin shapes, with
  the hardware JPEG decoder off (``hw_decoder_load=0``: nvJPEG's CUDA decoder alone) and on (DALI's default
  share of 0.9 to the hardware engines); the same operator and output types as ``radstream.shards.dali_backend``.
- ``e2e``: a synthetic corpus and its shards built with the project's own commands (``radstream synth``,
  ``radstream build-shards``) on local disk, then ``radstream.train.pretrain`` with the ViT-B/16 recipe for 200 steps on
  the DALI loader; reports the data-wait fraction the training loop logs in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radstream.gpu.measure import sync
from radstream.gpu.report import save
from radstream.shards.codecs import bit_depth, encode
from radstream.shards.loader import dali_available

REPO = Path(__file__).resolve().parents[2]
DECODE_SHAPES = ((224, 224), (256, 320))
DISTINCT_IMAGES = 32
"""Distinct encoded images, repeated to fill a batch (encoding jp2 in Python is slow)."""
HW_LOADS = {"off": 0.0, "on": 0.9}


def radiograph_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth field with mild noise in [0, 1] (compresses like a radiograph, unlike white noise)."""
    coarse = rng.uniform(0.2, 0.9, (1, 1, 6, 6)).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(height, width), mode="bicubic")
    noisy = field[0, 0].numpy() + rng.normal(0, 0.01, (height, width)).astype(np.float32)
    return np.clip(noisy, 0, 1)


def decode_rate(
    raws: list[np.ndarray], bits: int, hw_load: float, seconds: float, threads: int, device_id: int | None
) -> float:
    """Images/s of the decoder on ``raws`` (one batch, fed again every iteration): "mixed" on GPU
    ``device_id``, DALI's CPU decoder when it is None."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    pipe = Pipeline(batch_size=len(raws), num_threads=threads, device_id=device_id, prefetch_queue_depth=2,
                    exec_dynamic=True)  # fmt: skip
    where = {"device": "mixed", "hw_decoder_load": hw_load} if device_id is not None else {"device": "cpu"}
    with pipe:
        raw = fn.external_source(source=lambda: raws, dtype=types.UINT8, ndim=1)
        dtype = types.UINT8 if bits == 8 else types.UINT16
        pipe.set_outputs(fn.decoders.image(raw, output_type=types.GRAY, dtype=dtype, **where))
    pipe.build()
    for _ in range(3):
        pipe.run()
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        pipe.run()
        runs += 1
    if device_id is not None:
        sync(torch.device("cuda", device_id))
    rate = runs * len(raws) / (time.perf_counter() - start)
    del pipe
    return rate


def run_decode(
    out: Path, *, batch: int, seconds: float, shapes=DECODE_SHAPES, device_id: int | None = 0
) -> None:
    """Decode throughput rows (codec x shape x hardware JPEG decoder) into ``out``, saved after each row."""
    threads = min(8, os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    result = {"rows": [], "threads": threads}
    for shape in shapes:
        images = [radiograph_like(*shape, rng) for _ in range(DISTINCT_IMAGES)]
        for codec in ("jpg", "png16", "jp2"):
            encoded = [np.frombuffer(encode(im, codec), np.uint8) for im in images]
            raws = [encoded[i % len(encoded)] for i in range(batch)]
            loads = HW_LOADS if codec == "jpg" and device_id is not None else {"n/a": 0.0}
            for label, load in loads.items():
                rate = decode_rate(raws, bit_depth(codec), load, seconds, threads, device_id)
                result["rows"].append({"codec": codec, "shape": f"{shape[0]}x{shape[1]}", "hw_decoder": label,
                                       "batch": batch, "images_per_s": rate})  # fmt: skip
                save(out, result)


def command(*args: str, timeout_s: float | None = None) -> None:
    """Run one of the project's commands (its output goes to this part's log), killed after ``timeout_s``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, timeout=timeout_s)


def window_means(metrics: Path) -> dict:
    """Mean images/s and data-wait fraction of the logged training windows, the first one (compilation,
    the loader's start) left out when there are others."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    kept = train[1:] or train
    return {
        "windows": len(kept),
        "images_per_s": float(np.mean([r["images_per_s"] for r in kept])),
        "data_wait_frac": float(np.mean([r["data_wait_frac"] for r in kept])),
    }


def run_e2e(out: Path, quick: bool, deadline: float) -> None:
    images, steps, batch = (800, 30, 64) if quick else (4000, 200, 256)
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="gpu_e2e_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        command("-m", "radstream.cli", "synth", str(work / "synth"), "--n", str(images), "--max-side", "512",
                "--workers", str(workers))  # fmt: skip
        command("-m", "radstream.cli", "build-shards", str(work / "synth" / "images"), str(work / "shards"),
                "--labels", "folder", "--strategy", "fixed", "--workers", str(workers),
                "ingest.splits.fractions=[0.96,0.02,0.02]")  # fmt: skip
        built = time.perf_counter() - start
        run_dir, note = work / "run", None
        train = ("-m", "radstream.train.pretrain", "--config", str(REPO / "configs" / "pretrain" / "vit_b16_224.yaml"),
                f"shards={work / 'shards'}", f"run_dir={run_dir}", f"run.max_steps={steps}", "run.epochs=1000",
                "run.patience=0", "run.log_every=10", "run.grid_images=0", "run.tensorboard=false",
                "checkpoint.every_steps=0", f"run.compile={str(not quick).lower()}", f"loader.batch_size={batch}",
                 f"loader.num_workers={min(8, workers)}", "loader.backend=dali")  # fmt: skip
        try:
            command(*train, timeout_s=deadline - time.monotonic())
        except subprocess.TimeoutExpired:  # the windows logged so far still tell the data wait
            note = "training stopped at the part's time limit"
        metrics = run_dir / "metrics.jsonl"
        means = window_means(metrics) if metrics.exists() else {"note": "no training window was logged"}
        save(out, {"steps": steps, "batch": batch, "images": images, "loader": "dali (mixed)",
                   "build_seconds": built, "note": note} | means)  # fmt: skip


def run(part: str, out: Path, quick: bool, deadline: float) -> int:
    """Run ``decode`` or ``e2e`` (training stops at the monotonic ``deadline``); a skip note instead when
    DALI is missing."""
    if not dali_available():
        save(out, {"skipped": "nvidia.dali does not import (carry its wheels: docs/gpu.md)"})
        return 0
    if part == "decode" and quick:
        run_decode(out, batch=64, seconds=0.5, shapes=DECODE_SHAPES[:1])
    elif part == "decode":
        run_decode(out, batch=256, seconds=1.5)
    else:
        run_e2e(out, quick, deadline)
    return 0

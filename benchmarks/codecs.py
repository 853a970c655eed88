"""Codec benchmark on synthetic radiograph-like images: size, fidelity, encode and decode speed.

For each bin shape and codec (jpg q90, jpg q95, png, png16, jp2) it reports bytes per image, PSNR against the
float image (lossless codecs: "lossless" and the exact max abs error, which is the quantization error),
encode images/s (Pillow, one thread), decode images/s with Pillow (one thread) and with DALI's CPU decoder
(one thread, and all cores), and whether DALI's pixels equal Pillow's.

    python benchmarks/codecs.py --n 200
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from radstream.shards.codecs import bit_depth, decode, encode, quantize, to_float01  # noqa: E402

CODEC_RUNS = [("jpg", 90), ("jpg", 95), ("png", None), ("png16", None), ("jp2", None)]


def synthetic_radiograph(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A float [0, 1] image: soft tissue and bone-like smooth shapes, noise, and a black collimation border."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / h - 0.5, x / w - 0.5
    img = np.full((h, w), rng.uniform(0.05, 0.15), np.float32)
    # Soft tissue: one broad body-like ellipse with a smooth edge.
    cy, cx, ry, rx = (
        rng.uniform(-0.1, 0.1),
        rng.uniform(-0.1, 0.1),
        rng.uniform(0.3, 0.45),
        rng.uniform(0.25, 0.4),
    )
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    img += 0.35 / (1 + np.exp((r - 1) * 12))
    # Bones: a few rotated elongated ellipses, brighter, with a denser cortex ring.
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(-0.3, 0.3, 2)
        a, b, t = rng.uniform(0.15, 0.4), rng.uniform(0.03, 0.08), rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
        v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        img += 0.25 / (1 + np.exp((d - 1) * 20)) + 0.12 * np.exp(-(((d - 0.9) / 0.08) ** 2))
    img += rng.normal(0, rng.uniform(0.005, 0.02), (h, w)).astype(np.float32)  # quantum noise
    img = np.clip(img, 0, None)
    img = (img - img.min()) / (img.max() - img.min())
    # Collimation: a black frame of random width on each side.
    top, bottom = rng.integers(h // 40, h // 8, 2)
    left, right = rng.integers(w // 40, w // 8, 2)
    img[:top], img[h - bottom :], img[:, :left], img[:, w - right :] = 0, 0, 0, 0
    return img.astype(np.float32)


@dataclass
class Row:
    shape: str
    codec: str
    bytes_mean: float
    raw_ratio: float
    fidelity: str
    encode_ips: float
    pillow_ips: float
    dali_1t_ips: float
    dali_nt_ips: float
    dali_matches: str


def _rate(n: int, fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return n / (time.perf_counter() - start), result


def _fidelity(images: list[np.ndarray], decoded: list[np.ndarray], codec: str) -> str:
    err = max(float(np.abs(to_float01(d) - im).max()) for im, d in zip(images, decoded, strict=True))
    if all(np.array_equal(d, quantize(im, bit_depth(codec))) for im, d in zip(images, decoded, strict=True)):
        return f"lossless (max abs err {err:.2e})"
    psnrs = []
    for im, d in zip(images, decoded, strict=True):
        mse = float(np.mean((to_float01(d).astype(np.float64) - im) ** 2))
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(1 / mse))
    return f"{np.mean(psnrs):.1f} dB (min {min(psnrs):.1f}, max abs err {err:.3f})"


def dali_decode_rate(
    blobs: list[bytes], codec: str, threads: int, batch: int, min_seconds: float = 1.0
) -> tuple[float, list[np.ndarray]]:
    """Images/s of DALI's CPU decoder over ``blobs`` (GRAY; UINT16 for 16-bit codecs), and its first outputs.

    Runs at least one pass over ``blobs`` and at least ``min_seconds``, after one warm-up batch.
    """
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(b, np.uint8) for b in blobs]
    batch = min(batch, len(arrays))
    iters = max(1, len(arrays) // batch)
    state = {"i": 0}

    def source():
        i = state["i"]
        state["i"] += batch
        return [arrays[(i + k) % len(arrays)] for k in range(batch)]

    dtype = types.UINT16 if bit_depth(codec) == 16 else types.UINT8

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def pipe():
        # output_type GRAY: ANY_DATA crashed DALI 2.4's CPU decoder on grayscale JPEG.
        return fn.decoders.image(fn.external_source(source=source, batch=True), device="cpu",
                                 output_type=types.GRAY, dtype=dtype)  # fmt: skip

    p = pipe()
    p.build()
    (first,) = p.run()  # warm-up, also the outputs compared with Pillow
    outputs = [np.array(first[k])[..., 0] for k in range(batch)]
    runs, start = 0, time.perf_counter()
    while runs < iters or time.perf_counter() - start < min_seconds:
        p.run()
        runs += 1
    return runs * batch / (time.perf_counter() - start), outputs


def bench_codec(images: list[np.ndarray], codec: str, quality: int | None, args) -> Row:
    h, w = images[0].shape
    n = len(images)
    q = quality or 95
    encode(images[0], codec, q)  # warm-up
    enc_rate, blobs = _rate(n, lambda: [encode(im, codec, q) for im in images])
    pil_rate, decoded = _rate(n, lambda: [decode(b, codec) for b in blobs])
    dali = ("n/a", "n/a", "n/a")
    try:
        one, outs = dali_decode_rate(blobs, codec, 1, args.batch)
        many, _ = dali_decode_rate(blobs, codec, args.threads, args.batch)
        diff = max(
            int(np.abs(o.astype(np.int64) - d.astype(np.int64)).max())
            for o, d in zip(outs, decoded[: len(outs)], strict=True)
        )
        dali = (one, many, "exact" if diff == 0 else f"max diff {diff}")
    except ImportError:
        pass
    size = float(np.mean([len(b) for b in blobs]))
    raw = h * w * bit_depth(codec) / 8
    name = f"{codec} q{quality}" if quality else codec
    return Row(
        f"{h}x{w}", name, size, raw / size, _fidelity(images, decoded, codec), enc_rate, pil_rate, *dali
    )


def _fmt(v) -> str:
    return f"{v:,.0f}" if isinstance(v, float) else str(v)


def markdown(rows: list[Row], threads: int) -> str:
    head = ["shape", "codec", "bytes/img", "raw/bytes", "fidelity vs float", "encode img/s",
            "Pillow dec img/s", "DALI CPU dec img/s (1 thr)", f"DALI CPU dec img/s ({threads} thr)", "DALI = Pillow"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.shape, r.codec, f"{r.bytes_mean:,.0f}", f"{r.raw_ratio:.2f}", r.fidelity, _fmt(r.encode_ips),
                 _fmt(r.pillow_ips), _fmt(r.dali_1t_ips), _fmt(r.dali_nt_ips), r.dali_matches]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recommendation(rows: list[Row]) -> str:
    def mean(codec: str, attr: str) -> float:
        vals = [getattr(r, attr) for r in rows if r.codec == codec]
        return float(np.mean([v for v in vals if isinstance(v, float)] or [math.nan]))

    jpg, png16, jp2 = mean("jpg q95", "bytes_mean"), mean("png16", "bytes_mean"), mean("jp2", "bytes_mean")
    psnr = [float(r.fidelity.split()[0]) for r in rows if r.codec == "jpg q95"]
    return (
        f"Recommendation: jpg q95 for training shards ({jpg:,.0f} B/img, {min(psnr):.1f}-{max(psnr):.1f} dB, "
        f"{png16 / jpg:.1f}x smaller than png16, decoded by nvJPEG on the GPU); png16 when exact 16-bit "
        f"pixels matter ({png16:,.0f} B/img vs jp2 {jp2:,.0f}; png16 decodes "
        f"{mean('png16', 'pillow_ips') / mean('jp2', 'pillow_ips'):.1f}x faster than jp2 with Pillow)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per shape")
    parser.add_argument("--shapes", nargs="+", default=["224x224", "256x320"], help="bin shapes HxW")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI CPU threads")
    parser.add_argument("--batch", type=int, default=32, help="DALI batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    for shape in args.shapes:
        h, w = (int(v) for v in shape.split("x"))
        images = [synthetic_radiograph(h, w, rng) for _ in range(args.n)]
        for codec, quality in CODEC_RUNS:
            rows.append(bench_codec(images, codec, quality, args))
            print(f"done {shape} {rows[-1].codec}", file=sys.stderr)
    print(markdown(rows, args.threads))
    print()
    print(recommendation(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

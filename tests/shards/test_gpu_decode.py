"""The GPU path of the DALI loader: "mixed" decoding per codec, the DLPack hand-off, uint16 → float on the GPU.

Skipped without CUDA and nvidia.dali (``pytest -m gpu`` selects them; ``radstream gpu-check`` runs them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radstream.shards import codecs
from radstream.shards.images import to_unit_float, unit_float
from radstream.shards.loader import build_loader, dali_available
from radstream.shards.loader_config import LoaderConfig
from radstream.shards.manifest import read_samples
from tests.conftest import build_tiny_shards
from tests.shards.tar_member import read_member

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not dali_available(), reason="needs CUDA and nvidia.dali"
    ),
]

MIN_JPEG_PSNR_DB = 40.0
"""nvJPEG and libjpeg-turbo round the IDCT differently; q95 grayscale agrees to far better than this."""


@pytest.fixture(scope="module")
def codec_roots(tmp_path_factory, synth_corpus) -> dict[str, Path]:
    out = {}
    for codec in ("jpg", "png16", "jp2"):
        out[codec] = build_tiny_shards(synth_corpus, tmp_path_factory.mktemp(codec), f"shards.codec={codec}")
    return out


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two [0, 1] images; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("codec", ["jpg", "png16", "jp2"])
def test_mixed_decoding_matches_the_cpu_decode(codec_roots, codec: str) -> None:
    root = codec_roots[codec]
    table = {r["key"]: r for r in read_samples(root, "val").to_pylist()}
    cfg = LoaderConfig(backend="dali", batch_size=3, num_workers=2)
    seen = 0
    for batch in build_loader(cfg, root, "val", train=False, device="cuda"):
        assert batch["image"].is_cuda and batch["image"].dtype in (torch.uint8, torch.uint16)
        for key, image in zip(batch["key"], unit_float(batch["image"]).cpu(), strict=True):
            row = table[key]
            stored = codecs.decode(read_member(root / row["shard"], row["offset"], row["size"]), codec)
            expected = codecs.to_float01(stored)
            if codec == "jpg":
                assert psnr_db(image[0].numpy(), expected) >= MIN_JPEG_PSNR_DB, key
            else:  # lossless: the decoded integers bit-exact, all 16 bits
                decoded = np.rint(image[0].numpy().astype(np.float64) * 65535).astype(np.uint16)
                np.testing.assert_array_equal(decoded, stored, err_msg=key)
            seen += 1
    assert seen == len(table)


def test_dlpack_hand_off_keeps_the_batch_on_the_device(codec_roots) -> None:
    loader = build_loader(
        LoaderConfig(backend="dali", batch_size=4, num_workers=1),
        codec_roots["png16"],
        "val",
        train=False,
        device="cuda",
    )
    pipe, plan = loader._pipeline(), loader.epoch_plans(0)[0]
    fed = loader._feed(pipe, plan)
    output = loader._output(pipe, plan)
    del fed
    dense = output.as_tensor()
    stored = loader._to_torch(output, plan)
    # The same device memory DALI wrote: no copy, and never through the host.
    assert stored.is_cuda and stored.dtype == torch.uint16
    assert stored.data_ptr() == dense.data_ptr()
    assert stored.shape == (len(plan.rows), 1, *dense.shape()[1:3])
    loader.close()


def test_uint16_to_float_on_the_gpu() -> None:
    stored = torch.tensor([[0, 1, 32767, 32768, 65534, 65535]], dtype=torch.int32).to(torch.uint16)
    on_gpu = to_unit_float(stored.cuda(), 65535.0)
    assert on_gpu.is_cuda and on_gpu.dtype == torch.float32
    expected = np.divide(stored.numpy(), np.float32(65535), dtype=np.float32)
    np.testing.assert_array_equal(on_gpu.cpu().numpy(), expected)

"""The image half of the loader's batch contract: a batch's ``image`` holds the *stored* integers (uint8 or
uint16, [B, 1, H, W], on the training device), and every consumer turns them into float32 [0, 1] with
:func:`unit_float` inside its step, on the device.

Why integers: converting on the host cost the loader a fifth of its time on two cores, and floats are four
(uint8) or two (uint16) times the bytes through the worker queue, the pinned buffers and PCIe. FFCV and DALI
hand over integers for the same reason; the division is one fused elementwise pass on the device.
"""

from __future__ import annotations

import numpy as np
import torch

STORED_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}
"""The value that maps to 1.0, per stored dtype (the codecs store 8 or 16 bits, ``radstream.shards.codecs.bit_depth``)."""


def to_unit_float(stored: torch.Tensor, max_value: float) -> torch.Tensor:
    """Stored uint8 / uint16 integers → float32 ``stored / max_value`` on the tensor's own device.

    ``torch.uint16`` has only "barebones" support in eager mode (views and copies; CUDA has no arithmetic
    kernels for it), so its bits are reinterpreted as int16 and widened through int32, whose arithmetic every
    backend has. The divisor is a tensor on the same device: CUDA turns division by a Python number into a
    multiplication by its reciprocal, one rounding off numpy's quotient (``codecs.to_float01``).
    """
    if stored.dtype == torch.uint16:
        stored = stored.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    return torch.div(stored, torch.full((), max_value, dtype=torch.float32, device=stored.device))


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """A batch's ``image`` → float32 [0, 1] on its device: exactly ``codecs.to_float01`` of the stored values.

    Every consumer of loader batches calls it (the MAE and classifier steps, evaluation, embedding). A float
    tensor is returned as it is (the benchmarks' synthetic batches are float already).

    Raises:
        TypeError: an integer dtype the codecs never store.
    """
    if image.is_floating_point():
        return image
    if image.dtype not in STORED_MAX:
        raise TypeError(f"batch image of dtype {image.dtype}: the loader delivers uint8 or uint16")
    if image.device.type == "cpu":
        # numpy's ufunc runs on this thread alone; torch would wake its OpenMP pool, whose spinning threads
        # take the cores from the decoding workers (a 4x slowdown measured on 2 cores). Same quotient.
        top = np.float32(STORED_MAX[image.dtype])
        return torch.from_numpy(np.divide(image.numpy(), top, dtype=np.float32))
    return to_unit_float(image, STORED_MAX[image.dtype])

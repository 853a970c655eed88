"""The DALI backend: the schedule's encoded bytes go in through ``fn.external_source``, DALI decodes.

Why not ``fn.readers.webdataset``: it shards by sample index and shuffles internally, so it cannot follow the
bucketing schedule (exact per-rank sample sets, every sample once per epoch, the same keys as the torch
backend, exact mid-epoch resume). Instead the main process reads the image members of exactly the planned
samples by offset (cheap: one ``pread`` each) and feeds them, a few steps ahead, to one DALI pipeline, where
the heavy part runs on ``num_workers`` threads: decode (``device="mixed"``, i.e. nvJPEG / nvJPEG2000 on the
GPU, when the training device is CUDA; CPU operators otherwise) and the training crop and flip. The stored
integers then reach torch without a copy (DLPack on the GPU, the array interface on the CPU), and the
consumer's step makes them float on the device (``radstream.shards.images.unit_float``).

One pipeline serves every bin: a batch holds one bin, and the output shape of the resize is a per-sample
input, so a run with hundreds of strict bins still has one thread pool and one set of buffers (per-bin
pipelines would multiply both, and on the GPU the decoder state, by the number of bins). Buffers are sized up
front for the largest bin (``bytes_per_sample_hint``, the HW decoder's preallocation hints), so memory stays
flat across epochs.

Augmentation: the crop windows and flips come from the shared plan (drawn in Python from
``(seed, epoch, rank, step)``) and are fed as per-sample arguments of ``fn.resize`` (``roi_start`` /
``roi_end``, linear interpolation with antialiasing) and ``fn.flip``, instead of DALI's own random operators:
DALI's generators advance with every batch run, so a resumed run or the torch backend could not reproduce
them. Same parameters, same crops in both backends (up to interpolation rounding).

Speed on the CPU (benchmarks/loader.py): evaluation batches (decode only) come faster than from the torch
backend, but DALI's CPU resize costs about three JPEG decodes of a 224x224 image (its CPU kernels are not
tuned, as upstream says), so CPU-only training with augmentation runs faster on ``backend=torch``. On a GPU
every step here runs on the device.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import Pipeline

from radstream.shards.codecs import bit_depth
from radstream.shards.layout import DatasetError
from radstream.shards.loader_base import ShardLoader, StepPlan
from radstream.shards.loader_data import ShardFiles


def _decode(raw, *, gpu: bool, bits: int, hint: int, max_height: int, max_width: int):
    """The decoder node: gray, uint8 or uint16, "mixed" (nvJPEG / nvJPEG2000) on a GPU."""
    decode_args = {
        "output_type": types.GRAY,
        "dtype": types.UINT8 if bits == 8 else types.UINT16,
        "bytes_per_sample_hint": hint,
    }
    if gpu:
        decode_args.update(preallocate_height_hint=max_height, preallocate_width_hint=max_width)
    return fn.decoders.image(raw, device="mixed" if gpu else "cpu", **decode_args)


def _crop_and_flip(images, hint: int):
    """The augmentation nodes: crop (corners fed per sample) resized to the bin's shape, then the flip."""
    size, start, end = (
        fn.external_source(name=n, dtype=types.FLOAT, ndim=1) for n in ("size", "start", "end")
    )
    flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
    images = fn.resize(
        images,
        size=size,
        roi_start=start,
        roi_end=end,
        roi_relative=False,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
        bytes_per_sample_hint=hint,
    )
    return fn.flip(images, horizontal=flip, bytes_per_sample_hint=hint)


def image_pipeline(
    *,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    augment: bool,
    bits: int,
    max_height: int,
    max_width: int,
    seed: int = 0,
) -> Pipeline:
    """The decode (+ crop, flip) pipeline; inputs fed by name, one output: the stored integers [H, W, 1].

    The output stays uint8 / uint16 (resized in that type too, rounded like any integer image pipeline):
    torch converts to float in one vectorized pass on the training device, where DALI's CPU cast and
    arithmetic operators cost about a third of a 224x224 JPEG decode.

    Inputs: ``raw`` (encoded bytes, uint8 [n]) and, with ``augment``, ``size`` (float [2], output H, W),
    ``start`` / ``end`` (float [2], crop corners y, x in stored pixels) and ``flip`` (int32 scalar).

    Args:
        batch_size: the largest batch that will be fed.
        num_threads: DALI CPU worker threads.
        device_id: GPU index for "mixed" decoding and GPU operators; None: CPU only.
        augment: build the crop and flip stage.
        bits: stored bit depth, 8 or 16 (decoded to uint8 / uint16).
        max_height: height of the largest bin (sizes the buffers).
        max_width: width of the largest bin.
        seed: DALI's seed (no random operator draws from it; set for completeness).
    """
    gpu = device_id is not None
    hint = max_height * max_width * (1 if bits == 8 else 2)
    # The dynamic executor (DALI >= 1.44) hands out reference-counted outputs: a batch stays valid while torch
    # holds it through DLPack, even after later runs are scheduled. Prefetching is done by scheduling runs
    # ahead (DaliLoader._images), so the pipeline's own queue depth is 1.
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=1,
        exec_dynamic=True,
    )
    with pipe:
        # no_copy: DALI reads the fed byte arrays in place; DaliLoader keeps them alive until the run is out.
        raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1, no_copy=True)
        images = _decode(raw, gpu=gpu, bits=bits, hint=hint, max_height=max_height, max_width=max_width)
        if augment:
            images = _crop_and_flip(images, hint)
        pipe.set_outputs(images)
    pipe.build()
    return pipe


class DaliLoader(ShardLoader):
    """Loader backend on one DALI pipeline (CPU operators, or "mixed" GPU decoding on a CUDA device)."""

    backend = "dali"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._files = ShardFiles(self.data.shards, self.store)
        self._pipe: Pipeline | None = None

    def _pipeline(self) -> Pipeline:
        if self._pipe is None:
            gpu = self.device.type == "cuda"
            device_id = (
                (self.device.index if self.device.index is not None else torch.cuda.current_device())
                if gpu
                else None
            )
            self._pipe = image_pipeline(
                batch_size=max(self.batch_sizes.values()),
                num_threads=max(1, self.cfg.num_workers),
                device_id=device_id,
                augment=self.augment,
                bits=bit_depth(self.data.codec),
                max_height=max(b.height for b in self.data.bins.values()),
                max_width=max(b.width for b in self.data.bins.values()),
                seed=self.cfg.seed,
            )
        return self._pipe

    def _feed(self, pipe: Pipeline, plan: StepPlan) -> list[np.ndarray]:
        """Read the plan's encoded images and schedule one pipeline run on them.

        Returns:
            The fed byte arrays, which must stay alive until the run's output is taken (``no_copy``).
        """
        b, rows = self.data.bins[plan.bin], plan.rows
        data = self._files.read_rows(b.shard[rows].tolist(), b.offset[rows].tolist(), b.size[rows].tolist())
        raw = [np.frombuffer(d, np.uint8) for d in data]
        pipe.feed_input("raw", raw)
        if plan.crops is not None:
            corners = plan.crops.astype(np.float32)
            pipe.feed_input("size", [np.array([b.height, b.width], np.float32)] * len(plan.rows))
            pipe.feed_input("start", list(corners[:, :2]))
            pipe.feed_input("end", list(corners[:, :2] + corners[:, 2:]))
            pipe.feed_input("flip", [np.array(f, np.int32) for f in plan.flips])
        pipe.schedule_run()
        return raw

    def _to_torch(self, output, plan: StepPlan) -> torch.Tensor:
        """The pipeline's [B, H, W, 1] integers as a tensor [B, 1, H, W], through DLPack without a copy (on
        the GPU with "mixed" decoding)."""
        b = self.data.bins[plan.bin]
        dense = output.as_tensor()
        shape = dense.shape()
        if shape[1:3] != [b.height, b.width]:
            raise ValueError(f"bin {plan.bin}: decoded images are {shape[1]}x{shape[2]}, not the bin's shape")
        if self.device.type == "cpu":
            stored = torch.from_numpy(np.asarray(dense))  # the array interface: a view, no copy
        else:
            with self.device:  # as DALI's own torch iterator: DLPack syncs with this device's current stream
                stored = torch.from_dlpack(dense)
        return stored.view(shape[0], 1, shape[1], shape[2])  # C == 1: the same memory

    def _output(self, pipe: Pipeline, plan: StepPlan):
        """The next finished run, i.e. ``plan``'s batch; DALI's errors get the batch's keys added."""
        try:
            (output,) = pipe.outputs()
        except RuntimeError as err:
            lines = str(err).splitlines()
            cause = (
                next((ln for ln in lines[lines.index("encountered:") + 1 :] if ln.strip()), lines[-1])
                if ("encountered:" in lines)
                else lines[-1]
            )
            keys = self.data.bins[plan.bin].keys[plan.rows]
            shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
            raise DatasetError(
                f"DALI failed on step {plan.step} (bin {plan.bin}; one of the samples {shown} is bad, "
                f"`radstream verify-shards` or the torch backend names it): {cause.strip()}"
            ) from err
        return output

    def _images(self, plans: list[StepPlan]) -> Iterator[torch.Tensor]:
        pipe = self._pipeline()
        upcoming, pending = iter(plans), deque()  # pending: (plan, its fed bytes), oldest first
        try:
            for plan in itertools.islice(upcoming, self.cfg.prefetch):
                pending.append((plan, self._feed(pipe, plan)))
            while pending:
                plan, fed = pending.popleft()
                output = self._output(pipe, plan)
                del fed  # the run is finished: DALI no longer reads these bytes
                nxt = next(upcoming, None)
                if nxt is not None:  # DALI works on a later batch while this one is handed out
                    pending.append((nxt, self._feed(pipe, nxt)))
                yield self._to_torch(output, plan)
        except GeneratorExit:
            try:  # the consumer stopped early: collect the runs already scheduled for it
                for _ in pending:
                    pipe.outputs()
            except RuntimeError:
                self._pipe = None
            raise
        except BaseException:
            self._pipe = None  # DALI invalidates a pipeline after an error; build a fresh one next time
            raise

    def close(self) -> None:
        """Free the pipeline and the open shard files."""
        self._pipe = None
        self._files.close()
        if self.store is not None:
            self.store.close()

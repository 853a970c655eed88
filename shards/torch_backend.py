"""The pure torch fallback: a torch DataLoader whose workers read and decode whole batches.

The DataLoader runs with ``batch_size=None`` over a sampler of *step requests* (bin, rows, crops, flips):
each request is one finished batch, so a worker decodes all of its images (Pillow via ``radstream.shards.codecs``),
applies the crop and flip with ``torchvision.transforms.v2.functional`` (in uint8 / uint16, as DALI does)
and returns them as one integer tensor: a quarter of the bytes of floats through the worker queue and to
the GPU (from pinned memory); the consumer's step makes them float on the training device
(``radstream.shards.images.unit_float``). Workers are persistent; a new epoch only swaps the requests the sampler hands out. Batches come in the sampler's order whatever the number of
workers (the DataLoader keeps it)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from radstream.shards.codecs import bit_depth, decode
from radstream.shards.layout import DatasetError
from radstream.shards.loader_base import ShardLoader, StepPlan
from radstream.shards.loader_data import ShardFiles, SplitSamples
from radstream.shards.store import ShardStore

Request = tuple[str, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


class StepDataset(Dataset):
    """Map-style dataset: step request ``(bin, rows, crops, flips)`` → stored integers [B, 1, H, W] (uint8 or
    uint16; cropped and resized in that type, as DALI does)."""

    def __init__(self, data: SplitSamples, store: ShardStore | None = None) -> None:
        self.data = data
        self.files = ShardFiles(data.shards, store)

    def __getitem__(self, request: Request) -> torch.Tensor:
        name, rows, crops, flips = request
        b = self.data.bins[name]
        dtype = torch.uint8 if bit_depth(self.data.codec) == 8 else torch.uint16
        batch = torch.empty((len(rows), 1, b.height, b.width), dtype=dtype)
        data = self.files.read_rows(b.shard[rows].tolist(), b.offset[rows].tolist(), b.size[rows].tolist())
        for i, (row, raw) in enumerate(zip(rows, data, strict=True)):
            try:
                pixels = decode(raw, self.data.codec)
            except ValueError as err:
                raise DatasetError(
                    f"{self.data.shards[b.shard[row]]}: sample {b.keys[row]} does not decode ({err}); "
                    "run `radstream verify-shards` on the dataset"
                ) from None
            if pixels.shape != (b.height, b.width):
                raise ValueError(
                    f"sample {b.keys[row]}: decoded {pixels.shape}, bin {name} is {b.height}x{b.width}"
                )
            batch[i].numpy()[0] = pixels  # Pillow's array is read-only: copy it into the batch first
            if crops is not None:
                top, left, height, width = (int(v) for v in crops[i])
                image = F.resized_crop(
                    batch[i], top, left, height, width, [b.height, b.width], antialias=True
                )
                batch[i] = F.horizontal_flip(image) if flips[i] else image
        return batch


class _Requests(Sampler):
    """The step requests of the current pass; the loader replaces its plans before each pass. A request's
    crops and flips are drawn as the DataLoader asks for it (a few steps ahead), not all at the pass's start."""

    def __init__(self) -> None:
        self.plans: list[StepPlan] = []

    def __iter__(self) -> Iterator[Request]:
        return ((p.bin, p.rows, p.crops, p.flips) for p in self.plans)

    def __len__(self) -> int:
        return len(self.plans)


class TorchLoader(ShardLoader):
    """Loader backend on torch DataLoader workers (``num_workers`` processes; 0: the main process)."""

    backend = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._requests = _Requests()
        self._dataloader: DataLoader | None = None

    def _loader(self) -> DataLoader:
        if self._dataloader is None:
            workers = self.cfg.num_workers
            self._dataloader = DataLoader(
                StepDataset(self.data, self.store),
                batch_size=None,
                sampler=self._requests,
                num_workers=workers,
                persistent_workers=workers > 0,
                prefetch_factor=self.cfg.prefetch if workers > 0 else None,
                pin_memory=self.device.type == "cuda",
            )
        return self._dataloader

    def _images(self, plans: list[StepPlan]) -> Iterator[torch.Tensor]:
        self._requests.plans = plans
        if not plans:
            return
        yield from self._loader()

    def close(self) -> None:
        """Let the worker processes go (they stop when the DataLoader is freed); a later pass starts new ones."""
        self._dataloader = None
        if self.store is not None:
            self.store.close()  # stops prefetching; a later pass starts it again

"""Configuration of the streaming loader (``radstream.shards.loader.build_loader``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

BACKENDS = ("auto", "dali", "torch")


@dataclass(frozen=True)
class RemoteConfig:
    """Reading a shard dataset from ``s3://`` or ``http(s)://`` through a node-local cache."""

    cache_dir: str | None = None
    """Base folder of the node cache (node-local NVMe ideally); each dataset gets ``<cache_dir>/<hash of its
    URL and endpoint>``. None: ``$RADSTREAM_CACHE``, else ``~/.cache/radstream``."""
    max_cache_bytes: int | None = None
    """Bound on the bytes one dataset's cache folder holds; least recently used shards are evicted to stay
    under it. None: no bound, shards are evicted only when the disk is full."""
    cache_group: str | None = None
    """A group whose members share this node cache (folders 2770 with that group, files 0660). None: the
    cache is its owner's only (0700 / 0600), since shards hold images of patients."""
    prefetch: int = 4
    """Download threads fetching ahead of the schedule."""
    prefetch_shards: int = 8
    """Shards the loader keeps requested ahead of the step it is at."""
    s3_endpoint: str | None = None
    """S3 endpoint URL (MinIO, Ceph, ...); None: ``$RADSTREAM_S3_ENDPOINT``, ``$AWS_ENDPOINT_URL`` or AWS."""
    retries: int = 5
    """Attempts per request before a transient failure becomes an error."""
    backoff_s: float = 0.5
    """Wait before the second attempt; doubled for each further one (with jitter), at most 30 s."""
    timeout_s: float = 60.0
    """Seconds a connection attempt, or a wait for the next bytes of an answer, may take before the request
    counts as a transient failure (retried as above): a server that accepts and never answers, or stops
    mid-answer, fails in ``retries`` x this instead of hanging the job."""
    chunk_bytes: int = 8 << 20
    """Bytes per ranged GET: a failed request costs at most this much again."""
    max_pinned: int = 16
    """Shards one process keeps open (so not evictable): ``local_path``'s holds (``release`` frees them sooner)
    and, separately, the loader's open shards per reading process."""

    def __post_init__(self) -> None:
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ValueError(f"remote.max_cache_bytes must be >= 1 or None, got {self.max_cache_bytes}")
        if self.prefetch < 1 or self.prefetch_shards < 0 or self.max_pinned < 1:
            raise ValueError("remote.prefetch, max_pinned must be >= 1 and remote.prefetch_shards >= 0")
        if self.retries < 1 or self.backoff_s < 0 or self.chunk_bytes < 1 or not self.timeout_s > 0:
            raise ValueError(
                "remote.retries and remote.chunk_bytes must be >= 1, remote.backoff_s >= 0, remote.timeout_s > 0"
            )


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: a random resized crop back to the bin's shape, then a horizontal flip.

    Applied only when the loader is built with ``train=True``; evaluation loaders yield the stored pixels.
    The parameters of every crop and flip are drawn in Python from ``(seed, epoch, rank, step)``, so both
    backends apply the same ones and a resumed run repeats them exactly.
    """

    enabled: bool = True
    """Augment training batches at all."""
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Range of the crop's area as a fraction of the image's area (MAE uses [0.2, 1.0] on ImageNet; radiographs
    are mostly anatomy, so a milder lower end keeps more of it)."""
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """Range of the crop's aspect ratio (width / height) relative to the bin's own aspect ratio: [1, 1] cuts
    crops of exactly the bin's shape, so nothing is stretched when resized back to it."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip."""

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augment.scale must be [low, high] with 0 < low <= high <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment.ratio must be [low, high] with 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"augment.flip_prob must lie in [0, 1], got {self.flip_prob}")


@dataclass(frozen=True)
class LoaderConfig:
    """How shards become training batches on one rank."""

    backend: str = "auto"
    """``dali`` (DALI pipeline: GPU "mixed" decode when the device is CUDA, CPU decode otherwise), ``torch``
    (torch DataLoader workers decoding with Pillow) or ``auto`` (dali when ``nvidia.dali`` imports). On a
    CPU-only machine, training with augmentation is faster on torch (DALI's CPU resize is slow)."""
    batch_size: int = 64
    """Images per device batch; with ``token_budget`` the most images a device batch may hold."""
    token_budget: int | None = None
    """Patch tokens per device batch: each bin gets ``token_budget // tokens per image`` images (capped at
    ``batch_size``, at least 1), so big bins get smaller batches. None: ``batch_size`` for every bin."""
    patch_size: int = 16
    """Patch side in pixels, to count a bin's tokens for ``token_budget``."""
    strict: bool = False
    """Drop each bin's last incomplete global batch instead of padding it by wrap-around (VariViT-style
    strict binning); the skipped samples change every epoch and are counted in ``loader.skipped_samples``.
    Training only: evaluation always pads, so every sample is seen."""
    num_workers: int = 4
    """DataLoader worker processes (torch backend; 0 decodes in the main process) or DALI threads (at
    least 1)."""
    prefetch: int = 2
    """Batches prepared ahead of the one being consumed (DALI: steps fed ahead; torch: per worker)."""
    seed: int | None = None
    """Seed of the batch schedule and of the augmentation; the same seed gives the same batches. None: the
    training run's ``run.seed`` (so seeds vary data order and augmentation, not only the initialisation), 0
    where there is no run (embedding, benchmarks)."""
    shuffle_block: int = 4
    """Shards per shuffle block: each bin is read one block of this many shards at a time (its samples
    shuffled within the block, the blocks in random order), so a rank reads from a small window of shards and
    the next block can be fetched ahead. 0: every bin shuffled uniformly (reads touch every shard at once)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    """Node cache and transfers when the dataset root is an ``s3://`` or ``http(s)://`` URL."""
    verify: bool = True
    """Check each local shard's and the samples table's sha256 against the manifest when the loader is built
    (once per file per process) and stop with one line naming a corrupt file; false: trust them. There is no
    "skip with a warning": dropping samples on one rank would break the equal steps every rank must take.
    Remote shards are always verified as they are downloaded."""
    label_fraction: float | None = None
    """Keep only the train samples in this label fraction (one of the dataset's ``label_fractions``, e.g.
    0.01 for the 1% regime). Ignored for the val and test splits, which are always used whole."""
    label_subset: int | None = None
    """Which labelled subset of ``label_fraction`` (``radstream.shards.subsets``): 0 the build's, k >= 1 its own
    patient-grouped, class-stratified draw; None: the run's seed, so seed k of a study trains on subset k
    (as its probes and kNN do) and the spread over seeds covers which images carry labels."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"loader.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"loader.token_budget must be >= 1 or None, got {self.token_budget}")
        if self.patch_size < 1:
            raise ValueError(f"loader.patch_size must be >= 1, got {self.patch_size}")
        if self.num_workers < 0 or self.prefetch < 1:
            raise ValueError(
                f"loader.num_workers must be >= 0 and prefetch >= 1, got {self.num_workers}, {self.prefetch}"
            )
        if (self.seed is not None and self.seed < 0) or self.shuffle_block < 0:
            raise ValueError(
                f"loader.seed and loader.shuffle_block must be >= 0, got {self.seed}, {self.shuffle_block}"
            )
        if self.label_subset is not None and self.label_subset < 0:
            raise ValueError(f"loader.label_subset must be >= 0 or None, got {self.label_subset}")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(
                f"loader.label_fraction must lie in (0, 1] or be None, got {self.label_fraction}"
            )

    def for_run(self, run_seed: int) -> LoaderConfig:
        """This config with ``seed`` resolved for a training run: its own seed when set, else ``run_seed``."""
        return self if self.seed is not None else replace(self, seed=run_seed)

"""The streaming loader on tiny shards: both backends, schedule coverage, resume, fractions, budgets, eval."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from radstream.shards import codecs
from radstream.shards.images import to_unit_float, unit_float
from radstream.shards.loader import build_loader, dali_available
from radstream.shards.loader_config import AugmentConfig, LoaderConfig
from radstream.shards.loader_data import load_split
from radstream.shards.manifest import read_samples
from tests.conftest import build_tiny_shards
from tests.shards.tar_member import read_member

BACKENDS = [
    "torch",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no nvidia.dali")),
]


def make(root, backend="torch", split="train", *, rank=0, world=1, train=True, **cfg) -> object:
    cfg.setdefault("batch_size", 4)
    cfg.setdefault("num_workers", 0 if backend == "torch" else 1)
    config = LoaderConfig(backend=backend, **cfg)
    return build_loader(config, root, split, process_index=rank, num_processes=world, train=train)


def epoch_batches(loader, epoch=None) -> list[dict]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def keys_of(batches) -> list[list[str]]:
    return [b["key"] for b in batches]


def samples(root, split="train") -> dict[str, dict]:
    return {r["key"]: r for r in read_samples(root, split).to_pylist()}


@pytest.fixture(scope="module")
def codec_shards(request, tmp_path_factory, synth_corpus) -> dict[str, Path]:
    """The synthetic corpus built with the 16-bit codecs too (the default fixture is jpg)."""
    out = {}
    for codec in ("png16", "jp2"):
        out[codec] = build_tiny_shards(synth_corpus, tmp_path_factory.mktemp(codec), f"shards.codec={codec}")
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_backends_yield_same_keys_and_cover_the_split(tiny_shards: Path, world: int) -> None:
    expected = set(samples(tiny_shards))
    seen = Counter()
    for rank in range(world):
        torch_keys = keys_of(epoch_batches(make(tiny_shards, "torch", rank=rank, world=world)))
        if dali_available():
            assert keys_of(epoch_batches(make(tiny_shards, "dali", rank=rank, world=world))) == torch_keys
        seen.update(k for batch in torch_keys for k in batch)
    assert set(seen) == expected
    loader = make(tiny_shards, rank=0, world=world)
    assert sum(seen.values()) == len(expected) + loader.padded_samples  # repeats only as schedule padding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_contents(tiny_shards: Path, backend: str, train: bool) -> None:
    table = samples(tiny_shards)
    loader = make(tiny_shards, backend, train=train)
    batches = epoch_batches(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        height, width = (int(v) for v in batch["bin"].split("x"))
        n = len(batch["key"])
        assert n == loader.batch_sizes[batch["bin"]]
        # the stored integers cross over; unit_float makes them [0, 1] floats in the consumer's step
        assert batch["image"].shape == (n, 1, height, width) and batch["image"].dtype == torch.uint8
        image = unit_float(batch["image"])
        assert image.dtype == torch.float32 and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert batch["label"].dtype == torch.int64 and batch["foreground"].shape == (n, 4)
        assert batch["foreground"].dtype == torch.int64 and batch["valid"].dtype == torch.bool
        assert batch["label"].tolist() == [table[k]["label_index"] for k in batch["key"]]
        assert all(table[k]["bin"] == batch["bin"] for k in batch["key"])
        if not train:
            assert batch["foreground"].tolist() == [table[k]["foreground_bin"] for k in batch["key"]]
        box = batch["foreground"]
        assert bool(((box[:, :2] <= box[:, 2:]) & (box[:, 2:] <= torch.tensor([height, width]))).all())


def test_set_epoch_reshuffles_deterministically(tiny_shards: Path) -> None:
    a, b = make(tiny_shards), make(tiny_shards)
    e0, e1 = keys_of(epoch_batches(a, 0)), keys_of(epoch_batches(a, 1))
    assert keys_of(epoch_batches(b, 1)) == e1 and keys_of(epoch_batches(b, 0)) == e0
    assert e0 != e1
    assert {k for s in e0 for k in s} == {k for s in e1 for k in s}
    other_seed = make(tiny_shards, seed=1)
    assert keys_of(epoch_batches(other_seed, 0)) != e0


def test_epoch_advances_after_a_full_pass(tiny_shards: Path) -> None:
    loader = make(tiny_shards)
    first, second = keys_of(loader), keys_of(loader)
    assert loader.epoch == 2 and loader.step == 0
    assert second == keys_of(epoch_batches(make(tiny_shards), 1)) and first != second
    loader.set_epoch(2)  # the current epoch: a no-op
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_yields_exactly_the_rest(tiny_shards: Path, backend: str, monkeypatch) -> None:
    loader = make(tiny_shards, backend)
    loader.set_epoch(3)
    full = epoch_batches(loader, 3)
    loader = make(tiny_shards, backend)
    loader.set_epoch(3)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    assert state["epoch"] == 3 and state["step"] == 5
    it.close()
    assert keys_of(head) == keys_of(full[:5])

    reads = []
    from radstream.shards.loader_data import ShardFiles

    original = ShardFiles.read_rows

    def counted(self, shards, offsets, sizes):
        reads.extend(zip(shards, offsets, sizes, strict=True))
        return original(self, shards, offsets, sizes)

    monkeypatch.setattr(ShardFiles, "read_rows", counted)
    restored = make(tiny_shards, backend)
    restored.load_state_dict(state)
    restored.set_epoch(3)  # a resumed loop calls it again: must not rewind
    rest = list(restored)
    assert keys_of(rest) == keys_of(full[5:])
    assert len(reads) == sum(len(b["key"]) for b in rest)  # skipped batches were never read or decoded
    for got, want in zip(rest, full[5:], strict=True):
        assert torch.equal(got["image"], want["image"])  # same augmentation
        assert torch.equal(got["foreground"], want["foreground"])
    assert restored.epoch == 4 and restored.step == 0


def valid_keys(batches) -> list[str]:
    return [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]


def run_ranks(root: Path, world: int, *, state=None, stop=None, **cfg) -> tuple[list[str], dict, list]:
    """Simulated ranks of one world size: every rank's first ``stop`` batches (all: None) of the current
    epoch after ``state``; returns (the valid keys of all ranks, rank 0's state, the loaders)."""
    keys, loaders = [], []
    for rank in range(world):
        loader = make(root, rank=rank, world=world, **cfg)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        n = loader.batches_left if stop is None else stop
        keys += valid_keys([next(it) for _ in range(n)])
        if stop is None:
            assert next(it, None) is None
        it.close()
        loaders.append(loader)
    return keys, loaders[0].state_dict(), loaders


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("strict", [False, True])
def test_elastic_resume_trains_the_rest_of_the_epoch_once(
    tiny_shards: Path, old: int, new: int, strict
) -> None:
    """A loader state saved mid-epoch at ``old`` ranks resumes at ``new``: the epoch's samples, exactly."""
    cfg = {"strict": strict, "shuffle_block": 1, "seed": 3}
    first = make(tiny_shards, world=old, **cfg)
    first.set_epoch(2)
    stop = len(first) // 2
    head, state, _ = run_ranks(tiny_shards, old, state=first.state_dict(), stop=stop, **cfg)
    assert state["step"] == stop and state["num_processes"] == old
    rest, after, loaders = run_ranks(tiny_shards, new, state=state, **cfg)
    assert len({len(lo.epoch_plans(2)) for lo in loaders}) == 1  # equal steps on every rank
    everything = set(samples(tiny_shards))
    assert len(head) + len(rest) == len(set(head) | set(rest))  # nothing twice
    if strict:  # fewer than one global batch per bin left out, at either size
        assert set(head) | set(rest) <= everything
        assert len(everything) - len(set(head) | set(rest)) < len(first.data.bins) * 4 * max(old, new)
    else:
        assert set(head) | set(rest) == everything
    assert after["epoch"] == 3 and after["consumed"] == []  # the next epoch: the plain schedule of new
    plain = make(tiny_shards, world=new, **cfg)
    assert keys_of(epoch_batches(loaders[0], 3)) == keys_of(epoch_batches(plain, 3))


def test_elastic_resume_of_an_elastic_resume(tiny_shards: Path) -> None:
    """2 ranks, stopped; 3 ranks, stopped again; 1 rank finishes: every sample of the epoch once."""
    first = make(tiny_shards, world=2)
    head, state, _ = run_ranks(tiny_shards, 2, state=first.state_dict(), stop=len(first) // 3)
    middle, state, _ = run_ranks(tiny_shards, 3, state=state, stop=2)
    assert state["consumed"] == [[2, len(first) // 3]] and state["step"] == 2
    rest, _, _ = run_ranks(tiny_shards, 1, state=state)
    seen = head + middle + rest
    assert len(seen) == len(set(seen)) and set(seen) == set(samples(tiny_shards))


def test_elastic_resume_checks_the_batch_sizes(tiny_shards: Path) -> None:
    state = make(tiny_shards, rank=0, world=2).state_dict()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make(tiny_shards, batch_size=3).load_state_dict(state)
    make(tiny_shards).load_state_dict(state)  # another world size alone is the elastic path
    with pytest.raises(ValueError, match="steps at world size 2, not 10000"):
        make(tiny_shards).load_state_dict({**state, "step": 10_000})


def test_resume_checks_the_shuffle_block(tiny_shards: Path) -> None:
    state = make(tiny_shards, shuffle_block=1).state_dict()
    with pytest.raises(ValueError, match="shuffle_block"):
        make(tiny_shards, shuffle_block=2).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "shuffle_block"}  # a state saved before shuffle blocks
    with pytest.raises(ValueError, match="shuffle_block"):
        make(tiny_shards, shuffle_block=1).load_state_dict(old)
    make(tiny_shards, shuffle_block=0).load_state_dict(old)
    with pytest.raises(ValueError, match="shuffle_block"):
        LoaderConfig(shuffle_block=-1)


def shards_per_batch(root: Path, batches: list[dict]) -> list[int]:
    table = samples(root)
    return [len({table[k]["shard"] for k in b["key"]}) for b in batches]


def test_shuffle_blocks_read_one_shard_at_a_time_and_cover_the_split(tiny_shards: Path) -> None:
    """One shard per block: each bin's samples come shard after shard (each shard in one run), every sample
    once; the uniform shuffle (block 0) mixes more shards per batch."""
    table = samples(tiny_shards)
    blocked = epoch_batches(make(tiny_shards, shuffle_block=1, train=False))
    uniform = epoch_batches(make(tiny_shards, shuffle_block=0, train=False))
    keys = [k for b in blocked for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
    assert sorted(keys) == sorted(table)
    for name in {b["bin"] for b in blocked}:
        order = [table[k]["shard"] for k in keys if table[k]["bin"] == name]
        runs = 1 + sum(a != b for a, b in zip(order, order[1:], strict=False))
        assert runs == len(set(order))
    assert np.mean(shards_per_batch(tiny_shards, uniform)) > np.mean(shards_per_batch(tiny_shards, blocked))


def test_bin_samples_lie_shard_after_shard(tiny_shards: Path) -> None:
    for b in load_split(tiny_shards, "train").bins.values():
        assert (np.diff(b.shard) >= 0).all()
        assert sum(b.shard_counts) == len(b) and len(b.shard_counts) == len(set(b.shard.tolist()))


def test_label_fraction_keeps_only_that_subset(tiny_shards: Path) -> None:
    table = samples(tiny_shards)
    subset = {k for k, r in table.items() if any(abs(f - 0.1) < 1e-9 for f in r["fractions"])}
    assert 0 < len(subset) < len(table)
    loader = make(tiny_shards, label_fraction=0.1, batch_size=1)
    assert {k for b in loader for k in b["key"]} == subset and sum(loader.data.counts.values()) == len(subset)
    val = make(tiny_shards, "torch", "val", label_fraction=0.1)
    assert sum(val.data.counts.values()) == len(samples(tiny_shards, "val"))
    with pytest.raises(ValueError, match="label fraction 0.5"):
        make(tiny_shards, label_fraction=0.5)


def test_token_budget_gives_smaller_batches_to_bigger_bins(tiny_shards: Path) -> None:
    loader = make(tiny_shards, token_budget=100, batch_size=16, patch_size=16)
    tokens = {name: (b.height // 16) * (b.width // 16) for name, b in loader.data.bins.items()}
    assert len(set(tokens.values())) > 1
    by_tokens = sorted(tokens, key=tokens.get)
    sizes = [loader.batch_sizes[n] for n in by_tokens]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert all(loader.batch_sizes[n] == min(16, max(1, 100 // tokens[n])) for n in tokens)
    for batch in loader:
        assert len(batch["key"]) == loader.batch_sizes[batch["bin"]]


@pytest.mark.parametrize("world", [1, 2])
def test_strict_drops_incomplete_global_batches(tiny_shards: Path, world: int) -> None:
    counts = load_split(tiny_shards, "train").counts
    expected_skip = sum(c % (4 * world) for c in counts.values())
    assert expected_skip > 0
    keys = []
    for rank in range(world):
        loader = make(tiny_shards, rank=rank, world=world, strict=True)
        assert loader.skipped_samples == expected_skip and loader.padded_samples == 0
        batches = epoch_batches(loader)
        assert len(batches) == len(loader) == sum(c // (4 * world) for c in counts.values())
        assert all(bool(b["valid"].all()) for b in batches)
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == sum(counts.values()) - expected_skip
    assert make(tiny_shards, train=False, strict=True).skipped_samples == 0  # evaluation never drops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", ["jpg", "png16", "jp2"])
def test_eval_yields_stored_pixels(tiny_shards: Path, codec_shards, backend: str, codec: str) -> None:
    root = tiny_shards if codec == "jpg" else codec_shards[codec]
    table = samples(root, "val")
    for batch in make(root, backend, "val", train=False, batch_size=3):
        floats = unit_float(batch["image"])
        for key, image, f in zip(batch["key"], batch["image"], floats, strict=True):
            row = table[key]
            stored = codecs.decode(read_member(root / row["shard"], row["offset"], row["size"]), codec)
            np.testing.assert_array_equal(image[0].numpy(), stored)  # the stored integers, as they are
            # after conversion: exactly the codec's floats, so both backends give every consumer the same
            np.testing.assert_array_equal(f[0].numpy(), codecs.to_float01(stored))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_valid_mask_marks_each_sample_once(tiny_shards: Path, backend: str) -> None:
    expected = set(samples(tiny_shards, "test"))
    valid, steps = [], set()
    for rank in range(2):
        loader = make(tiny_shards, backend, "test", rank=rank, world=2, train=False, batch_size=3)
        batches = epoch_batches(loader)
        steps.add(len(batches))
        valid += [k for b in batches for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    assert len(steps) == 1  # equal steps on every rank
    assert sorted(valid) == sorted(expected)  # each sample valid exactly once; padding repeats are invalid
    assert loader.padded_samples > 0


@pytest.mark.skipif(not dali_available(), reason="no nvidia.dali")
def test_backends_apply_the_same_augmentation(tiny_shards: Path) -> None:
    for a, b in zip(make(tiny_shards, "torch", seed=5), make(tiny_shards, "dali", seed=5), strict=True):
        assert a["key"] == b["key"] and torch.equal(a["foreground"], b["foreground"])
        # Same crop windows and flips; the two resize kernels differ only in rounding at the edges.
        assert float((unit_float(a["image"]) - unit_float(b["image"])).abs().mean()) < 0.02


def test_torch_workers_keep_the_order(tiny_shards: Path) -> None:
    serial = epoch_batches(make(tiny_shards, num_workers=0))
    with make(tiny_shards, num_workers=2, prefetch=2) as loader:
        parallel = epoch_batches(loader)
        again = epoch_batches(loader)  # persistent workers, next epoch
    assert keys_of(parallel) == keys_of(serial)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(parallel, serial, strict=True))
    assert keys_of(again) == keys_of(epoch_batches(make(tiny_shards), 1))


def test_augmentation_changes_pixels_but_not_shapes(tiny_shards: Path) -> None:
    plain = {
        k: img for b in make(tiny_shards, train=False) for k, img in zip(b["key"], b["image"], strict=True)
    }
    changed = 0
    for batch in make(tiny_shards, augment=AugmentConfig(scale=[0.3, 0.6])):
        for key, image in zip(batch["key"], batch["image"], strict=True):
            assert image.shape == plain[key].shape
            changed += not torch.equal(image, plain[key])
    assert changed > 0.9 * len(plain)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="backend"):
        LoaderConfig(backend="fast")
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=[0.8, 0.2])
    with pytest.raises(ValueError, match="label_fraction"):
        LoaderConfig(label_fraction=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not dali_available(), reason="needs CUDA and nvidia.dali"
)
def test_dali_gpu_decodes_on_the_device(tiny_shards: Path) -> None:
    cfg = LoaderConfig(backend="dali", batch_size=4, num_workers=2)
    cpu = list(build_loader(cfg, tiny_shards, "val", train=False))
    gpu_loader = build_loader(cfg, tiny_shards, "val", train=False, device="cuda")
    gpu = list(gpu_loader)
    assert keys_of(gpu) == keys_of(cpu)
    for a, b in zip(cpu, gpu, strict=True):
        assert b["image"].device.type == "cuda" and b["label"].device.type == "cuda"
        # nvJPEG and libjpeg-turbo may round differently.
        assert float((unit_float(a["image"]) - unit_float(b["image"]).cpu()).abs().max()) <= 3 / 255
    train = list(build_loader(cfg, tiny_shards, "train", device="cuda"))
    assert all(b["image"].is_cuda and b["image"].dtype == torch.uint8 for b in train)
    assert all(float(unit_float(b["image"]).max()) <= 1.0 for b in train)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_image_fails_with_its_key(tiny_shards: Path, tmp_path: Path, backend: str) -> None:
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    row = next(iter(samples(root, "val").values()))
    with open(root / row["shard"], "r+b") as f:
        f.seek(row["offset"] + 2)  # right after the JPEG start marker: the headers become garbage
        f.write(b"not a jpeg" * 20)
    loader = make(root, backend, "val", train=False, batch_size=2, verify=False)  # else the checksum stops it
    with pytest.raises((ValueError, RuntimeError), match=row["key"]):
        epoch_batches(loader)


def test_a_relative_dataset_root_works(tiny_shards, monkeypatch) -> None:
    """`make demo` passes demo_out/shards: a relative root must reach the same files as the absolute one."""
    monkeypatch.chdir(tiny_shards.parent)
    cfg = LoaderConfig(backend="torch", batch_size=4, num_workers=0)
    relative = [b["key"] for b in build_loader(cfg, tiny_shards.name, "val", train=False)]
    absolute = [b["key"] for b in build_loader(cfg, tiny_shards, "val", train=False)]
    assert relative == absolute and relative


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_to_unit_float_is_numpys_quotient(dtype) -> None:
    # uint16 goes through an int16 view (CUDA has no uint16 arithmetic): values above 32767 must survive it.
    top = np.iinfo(dtype).max
    stored = np.array([[0, 1, top // 2, top // 2 + 1, top - 1, top]], dtype=dtype)
    out = to_unit_float(torch.from_numpy(stored), float(top))
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), np.divide(stored, np.float32(top), dtype=np.float32))
    # the consumers' helper: the same quotient on the CPU path (numpy) as on the device path (torch)
    np.testing.assert_array_equal(unit_float(torch.from_numpy(stored)).numpy(), out.numpy())
    floats = torch.rand(2, 3)
    assert unit_float(floats) is floats  # float batches (the benchmarks' synthetic ones) pass as they are
    with pytest.raises(TypeError, match="uint8 or uint16"):
        unit_float(torch.zeros(2, dtype=torch.int32))


def test_an_epoch_boundary_draws_no_augmentation(tiny_shards: Path, monkeypatch) -> None:
    # each step draws its crops when first asked, from the seed (seed, epoch, rank, step) it always had
    from radstream.bucketing.dataplan import crop_params
    from radstream.shards import loader_base

    calls = []
    monkeypatch.setattr(loader_base, "crop_params", lambda *a: calls.append(a) or crop_params(*a))
    loader = make(tiny_shards, seed=3, rank=1, world=2)
    plans = loader.epoch_plans(1)
    assert not calls and len(plans) > 2
    aug, b = loader.cfg.augment, loader.data.bins[plans[2].bin]
    rng = np.random.default_rng(np.random.SeedSequence([3, 1, 1, 2, loader_base._AUGMENT_STREAM]))
    crops = crop_params(rng, len(plans[2].rows), b.height, b.width, aug.scale, aug.ratio)
    assert np.array_equal(plans[2].crops, crops) and len(calls) == 1
    assert np.array_equal(plans[2].flips, rng.random(len(crops)) < aug.flip_prob) and len(calls) == 1

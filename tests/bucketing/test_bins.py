"""Bin shapes, planning strategies, assignment, fit geometry and the planning report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from radstream.bucketing import (
    Bin,
    BinningConfig,
    assign_bins,
    assign_strict,
    assign_with_config,
    capped_shapes,
    fit_geometry,
    parse_bins,
    plan_bins,
    plan_fixed,
    plan_report,
    plan_smart,
    plan_strict,
)


def synthetic_sizes(n: int, seed: int = 0) -> np.ndarray:
    """Sides 200-2500 px, aspect (h/w) 0.4-2.5, like a mixed radiograph archive."""
    rng = np.random.default_rng(seed)
    out = np.empty((0, 2), dtype=np.int64)
    while len(out) < n:
        hw = rng.integers(200, 2501, size=(2 * n, 2))
        aspect = hw[:, 0] / hw[:, 1]
        out = np.concatenate([out, hw[(aspect >= 0.4) & (aspect <= 2.5)]])
    return out[:n]


@pytest.fixture(scope="module")
def sizes() -> np.ndarray:
    return synthetic_sizes(5000)


def test_bin_basics() -> None:
    b = Bin(224, 288)
    assert b.name == "224x288"
    assert b.tokens(16) == 14 * 18
    assert b.aspect == pytest.approx(224 / 288)
    assert Bin.parse("224x288") == b
    assert Bin.parse(" 192X256 ") == Bin(192, 256)
    assert sorted([Bin(256, 192), Bin(192, 256), Bin(192, 192)]) == [
        Bin(192, 192),
        Bin(192, 256),
        Bin(256, 192),
    ]
    with pytest.raises(ValueError, match="patch size"):
        Bin(200, 224).tokens(16)
    with pytest.raises(AttributeError):
        b.height = 16  # type: ignore[misc]


@pytest.mark.parametrize(
    "junk", ["", "224", "224x", "x224", "axb", "0x224", "-16x16", "224x224x3", "22.4x16"]
)
def test_bin_parse_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError):
        Bin.parse(junk)


def test_parse_bins_sorts_and_dedupes() -> None:
    assert parse_bins("256x192, 224x224,192x256,224x224") == [Bin(192, 256), Bin(224, 224), Bin(256, 192)]
    with pytest.raises(ValueError, match="patch size"):
        parse_bins("224x224,200x224", patch_size=16)
    with pytest.raises(ValueError):
        parse_bins(" , ")


def test_plan_fixed() -> None:
    assert plan_fixed() == [Bin(224, 224)]
    assert plan_fixed("192x256", 16) == [Bin(192, 256)]
    with pytest.raises(ValueError):
        plan_fixed((225, 224), 16)


def test_capped_shapes_hand_examples() -> None:
    src = np.array([[224, 224], [448, 448], [100, 300], [32, 32], [10, 5000], [5000, 10], [8, 8]])
    patches = capped_shapes(src, patch_size=16, max_tokens=196)
    assert patches.tolist() == [
        [14, 14],  # exactly the budget: kept
        [14, 14],  # scaled down by 2
        [6, 18],  # 117 tokens: never scaled up, floored to the grid
        [2, 2],
        [1, 196],  # one patch high; the long side shortened to fit the budget
        [196, 1],
        [1, 1],  # smaller than a patch: one patch per side
    ]


def test_plan_strict(sizes: np.ndarray) -> None:
    bins = plan_strict(sizes, patch_size=16, max_tokens=196)
    assert bins == sorted(set(bins))
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in bins)
    assert all(b.tokens(16) <= 196 for b in bins)
    assert plan_strict([[224, 224], [448, 448], [100, 300]]) == [Bin(96, 288), Bin(224, 224)]
    # Every source's capped shape is a bin, and strict assignment puts it exactly there.
    assignment = assign_strict(sizes, bins, 16, 196)
    expected = capped_shapes(sizes, 16, 196) * 16
    got = np.array([[bins[i].height, bins[i].width] for i in assignment])
    np.testing.assert_array_equal(got, expected)


def test_assign_strict_falls_back_to_closest() -> None:
    bins = [Bin(224, 224), Bin(160, 304)]
    assignment = assign_strict([[224, 224], [1000, 2000], [2000, 1000]], bins, 16, 196)
    assert assignment.tolist() == [0, 1, 0]


def test_plan_smart_on_synthetic(sizes: np.ndarray) -> None:
    bins = plan_smart(sizes, num_bins=4, patch_size=16, max_tokens=196)
    assert 1 <= len(bins) <= 4
    assert bins == sorted(set(bins))
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in bins)
    assert all(b.tokens(16) <= 196 for b in bins)
    # Large sources: every shape uses (nearly) the whole budget; both orientations are covered.
    assert all(b.tokens(16) >= 180 for b in bins)
    assert min(b.aspect for b in bins) < 0.8 and max(b.aspect for b in bins) > 1.25
    assert plan_smart(sizes, num_bins=4, seed=0) == bins


def test_plan_smart_finds_the_modes() -> None:
    portrait = np.tile([[1200, 900]], (300, 1))  # 4:3 portrait
    landscape = np.tile([[900, 1200]], (100, 1))
    bins = plan_smart(np.concatenate([portrait, landscape]), num_bins=2, patch_size=16, max_tokens=192)
    assert bins == [Bin(192, 256), Bin(256, 192)]


def test_plan_smart_degenerate_inputs() -> None:
    assert plan_smart(np.tile([[2000, 2000]], (50, 1)), num_bins=4) == [Bin(224, 224)]
    # Small sources keep their median area rather than being blown up to the budget.
    assert plan_smart(np.tile([[320, 320]], (10, 1)), num_bins=3, max_tokens=1024) == [Bin(320, 320)]
    with pytest.raises(ValueError):
        plan_smart(np.zeros((0, 2)), num_bins=2)


def test_assign_bins_picks_the_obvious_shape() -> None:
    bins = [Bin(224, 224), Bin(192, 256), Bin(256, 192)]
    src = np.array([[1000, 1000], [750, 1000], [1000, 750], [600, 1000], [2400, 1800], [230, 220]])
    assert assign_bins(src, bins).tolist() == [0, 1, 2, 1, 2, 0]
    # Same aspect, different scale: the scale term decides.
    sized = [Bin(112, 112), Bin(224, 224)]
    assert assign_bins([[120, 120], [2000, 2000], [200, 200]], sized).tolist() == [0, 1, 1]


def test_assign_bins_is_vectorised() -> None:
    src = synthetic_sizes(700_000, seed=1)
    bins = [Bin(224, 224), Bin(192, 256), Bin(256, 192), Bin(160, 304), Bin(304, 160)]
    start = time.perf_counter()
    assignment = assign_bins(src, bins, max_tokens=196)
    assert time.perf_counter() - start < 1.0
    assert assignment.shape == (700_000,) and assignment.min() >= 0 and assignment.max() < 5
    np.testing.assert_array_equal(assignment[:1000], assign_bins(src[:1000], bins, max_tokens=196))


def test_fit_stretch() -> None:
    geom = fit_geometry(1000, 500, Bin(224, 224), "stretch")
    assert geom.resized == (224, 224)
    assert geom.offset == (0, 0) and geom.paste_offset == (0, 0) and geom.crop_box == (0, 0, 224, 224)
    assert geom.map_box((0, 0, 1000, 500)) == (0, 0, 224, 224)
    assert geom.map_box((500, 250, 1000, 500)) == (112, 112, 224, 224)


def test_fit_pad_letterboxes_centred() -> None:
    geom = fit_geometry(1000, 500, Bin(224, 224), "pad")
    assert geom.resized == (224, 112)
    assert geom.offset == geom.paste_offset == (0, 56)  # letterbox margin
    assert geom.crop_box == (0, 0, 224, 112)
    assert geom.map_box((0, 0, 1000, 500)) == (0, 56, 224, 168)
    assert geom.map_box((0, 0, 500, 250)) == (0, 56, 112, 112)


def test_fit_crop_covers_and_centres() -> None:
    geom = fit_geometry(1000, 500, Bin(224, 224), "crop")
    assert geom.resized == (448, 224)
    assert geom.offset == (112, 0)  # crop window in the resized image
    assert geom.paste_offset == (0, 0)
    assert geom.crop_box == (112, 0, 336, 224)
    assert geom.map_box((0, 0, 1000, 500)) == (0, 0, 224, 224)
    assert geom.map_box((0, 0, 250, 500)) == (0, 0, 0, 224)  # cut off entirely: empty
    assert geom.map_box((400, 100, 600, 400)) == (67, 44, 157, 180)  # rounded outward


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_fit_keeps_aspect(mode: str, sizes: np.ndarray) -> None:
    for (h, w), b in zip(sizes[:300], [Bin(224, 224), Bin(192, 256), Bin(160, 304)] * 100, strict=True):
        geom = fit_geometry(int(h), int(w), b, mode)
        rh, rw = geom.resized
        scale = min(b.height / h, b.width / w) if mode == "pad" else max(b.height / h, b.width / w)
        assert abs(rh - h * scale) <= 0.5 + 1e-9 and abs(rw - w * scale) <= 0.5 + 1e-9
        y0, x0, y1, x1 = geom.crop_box
        py, px = geom.paste_offset
        if mode == "pad":
            assert rh <= b.height and rw <= b.width and (rh == b.height or rw == b.width)
            assert (y0, x0, y1, x1) == (0, 0, rh, rw)
            assert abs(py - (b.height - rh - py)) <= 1 and abs(px - (b.width - rw - px)) <= 1
        else:
            assert rh >= b.height and rw >= b.width and (rh == b.height or rw == b.width)
            assert (y1 - y0, x1 - x0) == (b.height, b.width) and (py, px) == (0, 0)
            assert abs(y0 - (rh - y1)) <= 1 and abs(x0 - (rw - x1)) <= 1
        assert geom.map_box((0, 0, int(h), int(w))) == (py, px, py + y1 - y0, px + x1 - x0)


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fit mode"):
        fit_geometry(10, 10, Bin(16, 16), "squash")
    with pytest.raises(ValueError):
        fit_geometry(0, 10, Bin(16, 16), "pad")
    with pytest.raises(ValueError):
        fit_geometry(10, 10, Bin(16, 16), "pad").map_box((0, 0, 11, 10))


def test_plan_report_hand_example() -> None:
    bins = [Bin(224, 224), Bin(192, 256)]
    src = np.array([[224, 224], [100, 200], [300, 400]])
    assignment = np.array([0, 0, 1])
    report = plan_report(src, bins, assignment, 16, batch_size=2, mode="stretch")
    assert [(b.name, b.count, b.tokens) for b in report.bins] == [("224x224", 2, 196), ("192x256", 1, 192)]
    assert report.num_images == 3
    assert report.mean_tokens == pytest.approx((196 + 196 + 192) / 3)
    assert report.mean_distortion == pytest.approx(math.log(2) / 3)
    assert report.padding_fraction == 0.0 and report.cropped_fraction == 0.0
    assert report.stranded_images == 1 and report.skipped_images == 1
    # 100x200 letterboxed into 224x224 is 112x224: half the bin is padding.
    pad = plan_report(src, bins, assignment, 16, mode="pad")
    assert pad.padding_fraction == pytest.approx(0.5 / 3)
    assert pad.mean_distortion == pytest.approx(0.0)
    assert pad.stranded_images is None
    # ... and cropped into it is 224x448: half the resized source is cut away.
    crop = plan_report(src, bins, assignment, 16, batch_size=3, mode="crop")
    assert crop.cropped_fraction == pytest.approx(0.5 / 3)
    assert crop.padding_fraction == 0.0
    assert crop.stranded_images == 3 and crop.skipped_images == 3
    text = report.to_text()
    assert "224x224" in text and "192x256" in text and "never fill a batch" in text
    assert json.loads(json.dumps(report.to_dict()))["bins"][1]["count"] == 1
    with pytest.raises(ValueError):
        plan_report(src, bins, np.array([0, 2, 1]), 16)


def test_binning_config_validation() -> None:
    BinningConfig()
    BinningConfig(strategy="smart", bins="224x224,192x256,256x192")
    for bad in (
        {"strategy": "magic"},
        {"fit": "squash"},
        {"num_bins": 0},
        {"shape": "224"},
        {"shape": "200x224"},
        {"bins": "224x224,200x224"},
        {"scale_weight": -1.0},
    ):
        with pytest.raises(ValueError):
            BinningConfig(**bad)


def test_binning_config_loads_through_omegaconf() -> None:
    from radstream.core.config import ConfigError, load_config

    cfg = load_config(BinningConfig, overrides=["strategy=smart", "bins=224x224,192x256", "fit=pad"])
    assert cfg.bins == "224x224,192x256" and cfg.fit == "pad"
    with pytest.raises(ConfigError):
        load_config(BinningConfig, overrides=["fit=squash"])


def test_plan_bins_dispatches(sizes: np.ndarray) -> None:
    assert plan_bins(BinningConfig(strategy="fixed"), sizes) == [Bin(224, 224)]
    assert plan_bins(BinningConfig(strategy="strict"), sizes) == plan_strict(sizes, 16, 196)
    assert plan_bins(BinningConfig(strategy="smart", num_bins=3), sizes) == plan_smart(sizes, 3, 16, 196)
    given = BinningConfig(bins="256x192,224x224")
    bins = plan_bins(given, sizes)
    assert bins == [Bin(224, 224), Bin(256, 192)]
    assignment = assign_with_config(given, sizes, bins)
    assert set(np.unique(assignment).tolist()) == {0, 1}
    fixed = BinningConfig(strategy="fixed")
    assert not assign_with_config(fixed, sizes, plan_bins(fixed, sizes)).any()


def test_importable_without_torch() -> None:
    code = "import sys, bucketing; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

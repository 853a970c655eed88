"""`radstream gpu-check` (``radstream.gpu``) on the CPU: the no-GPU line, the parsers, MFU, the targets, the report,
the budget, and the MAE part's code path on a tiny model: it times the trainer's own step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import radstream.gpu.check as gpucheck
from radstream.cli import main as cli_main
from radstream.gpu import report as gpureport
from radstream.gpu.mae import attention_backend, top_kernels
from radstream.shards.loader import dali_available
from tests.accelerate_state import reset_accelerate

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.shards.test_gpu_decode" name="test_mixed[jpg]" time="1.2"/>
<testcase classname="tests.shards.test_gpu_decode" name="test_mixed[jp2]" time="0.4">
  <failure message="AssertionError: arrays differ&#10;second line">trace</failure></testcase>
<testcase classname="tests.train.test_pretrain" name="test_gpu_run" time="9.0"/>
<testcase classname="tests.shards.test_gpu_decode" name="test_dlpack" time="0.0">
  <skipped message="needs CUDA and nvidia.dali"/></testcase>
</testsuite></testsuites>"""


JUNIT_RESULT = {"passed": 2, "failed": 1, "errors": 0, "skipped": 1, "skips": [],
                "failures": [{"test": "tests.shards.test_gpu_decode::test_mixed[jp2]", "message": "arrays differ"}]}  # fmt: skip


def canned_parts(images_per_s: float = 5200.0, mfu: float = 0.30, wait: float = 0.02) -> dict:
    return {
        "tests": {"status": "failed", "seconds": 30.0, "result": JUNIT_RESULT},
        "mae": {"status": "ok", "seconds": 120.0, "result": {
            "rows": [{"mode": "fixed 224, compiled", "batch": 256, "images_per_s": images_per_s,
                      "tokens_per_s": images_per_s * 196, "foreground_tokens_per_s": None,
                      "gflops_per_image": 60.0, "mfu": mfu, "attention": "flash", "peak_mem_gib": 40.0}],
            "profile": [{"name": "sm90_xmma_gemm_bf16", "gpu_ms": 20.0, "calls": 100, "share": 0.6}]}},
        "decode": {"status": "skipped", "note": "nvidia.dali does not import", "result": {}},
        "e2e": {"status": "ok", "seconds": 100.0, "result": {
            "steps": 200, "batch": 256, "images": 4000, "images_per_s": 4000.0, "data_wait_frac": wait,
            "loader": "dali (mixed)"}},
    }  # fmt: skip


def test_without_a_gpu_one_line_and_exit_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpucheck, "no_gpu_reason", lambda: "no CUDA GPU here")
    assert cli_main(["gpu-check", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == ["gpu-check: no CUDA GPU here"]
    assert not (tmp_path / "out").exists()


def test_parse_junit_counts_and_failures(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    r = gpureport.parse_junit(tmp_path / "r.xml")
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (2, 1, 0, 1)
    assert r["failures"] == [
        {"test": "tests.shards.test_gpu_decode::test_mixed[jp2]", "message": "AssertionError: arrays differ"}
    ]
    assert r["skips"][0]["message"] == "needs CUDA and nvidia.dali"


def test_parse_pytest_summary():
    out = "....F.s\n=== short test summary ===\nFAILED x\n2 failed, 10 passed, 3 skipped, 1 error in 12.31s\n"
    assert gpureport.parse_pytest_summary(out) == {"failed": 2, "passed": 10, "skipped": 3, "errors": 1}
    assert gpureport.parse_pytest_summary("== 4 passed, 200 deselected in 3.0s ==") == {
        "passed": 4,
        "deselected": 200,
    }
    assert gpureport.parse_pytest_summary("Killed\n") == {}


def test_peak_and_mfu():
    assert gpureport.peak_tflops("NVIDIA H200") == 989.0
    assert gpureport.peak_tflops("NVIDIA H100 PCIe") == 756.0  # the longest matching name wins
    assert gpureport.peak_tflops("NVIDIA H200", override=800.0) == 800.0
    assert gpureport.peak_tflops("Quadro P1000") is None
    # 100 GFLOP/image at 3,000 images/s = 300 TFLOP/s of a 1,000 TFLOP/s peak.
    assert gpureport.mfu(100e9, 3000.0, 1000.0) == pytest.approx(0.30)
    assert gpureport.mfu(100e9, 3000.0, None) is None


def test_targets_met_missed_and_not_measured():
    goals = {t.name: t.met for t in gpureport.targets(canned_parts())}
    assert list(goals.values()) == [True, False, True]
    assert [t.met for t in gpureport.targets(canned_parts(4000.0, 0.40, 0.05))] == [False, True, False]
    assert [t.met for t in gpureport.targets({})] == [None, None, None]


def test_markdown_table():
    table = gpureport.markdown_table(["name", "images/s", "ok"], [("a|b", 5123.4, True), ("c", 0.1234, None)])
    assert table.splitlines() == [
        "| name | images/s | ok |",
        "|---|---:|---|",
        "| a\\|b | 5,123 | yes |",
        "| c | 0.123 | — |",
    ]


def test_report_shows_the_profile_only_when_a_target_is_missed():
    env = {
        "device": "NVIDIA H200",
        "date": "2026-11-30",
        "command": "radstream gpu-check",
        "peak_tflops": 989.0,
    }
    missed = gpureport.render_report({"env": env, "parts": canned_parts()})
    assert "| MAE ViT-B/16 compiled bf16, MFU | 0.3 | ≥ 0.35 | missed |" in missed
    assert "sm90_xmma_gemm_bf16" in missed and "1 failed" in missed and "test_mixed[jp2]" in missed
    assert "| decode | skipped |" in missed
    met = gpureport.render_report({"env": env, "parts": canned_parts(6000.0, 0.5, 0.01)})
    assert "sm90_xmma_gemm_bf16" not in met and "missed" not in met


def test_attention_backend_and_top_kernels():
    assert (
        attention_backend(["aten::_scaled_dot_product_flash_attention", "void flash_fwd_kernel<>"]) == "flash"
    )
    assert attention_backend(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == "memory-efficient"
    assert attention_backend(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]) == "cudnn"
    assert attention_backend(["aten::bmm", "aten::_softmax"]) == "math"
    rows = top_kernels([("a", 100.0, 1), ("b", 300.0, 2), ("c", 600.0, 3)], n=2)
    assert [r["name"] for r in rows] == ["c", "b"] and rows[0]["share"] == pytest.approx(0.6)


def test_run_check_budget_timeout_and_partial_results(tmp_path, monkeypatch):
    # Fake parts: one writes its result, one hangs past its limit, one never starts (budget spent).
    script = {
        "fast": "import json,sys; json.dump({'rows': []}, open(sys.argv[1], 'w'))",
        "hang": "import time; print('working', flush=True); time.sleep(60)",
        "late": "pass",
    }
    parts = (gpucheck.Part("fast", 20, 20), gpucheck.Part("hang", 3, 3), gpucheck.Part("late", 30, 30))
    monkeypatch.setattr(gpucheck, "PARTS", parts)
    monkeypatch.setattr(gpucheck, "_MIN_PART_S", 2.5)  # fast takes < 2 s: hang starts, late cannot
    monkeypatch.setattr(gpucheck, "environment", lambda *a: {"device": "fake", "peak_tflops": None})
    monkeypatch.setattr(
        gpucheck,
        "part_command",
        lambda part, work, quick, peak, limit: [
            sys.executable,
            "-c",
            script[part],
            str(work / f"{part}.json"),
        ],
    )
    report = gpucheck.run_check(tmp_path, quick=True, budget_s=5.0, peak=None, command="test")
    status = {name: p["status"] for name, p in report["parts"].items()}
    assert status == {"fast": "ok", "hang": "timeout", "late": "skipped"}
    assert "working" in report["parts"]["hang"]["log_tail"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["parts"]["late"]["note"] == "the overall budget is spent"
    assert "| hang | timeout |" in (tmp_path / "gpu_check.md").read_text()
    assert "===== hang: timeout" in (tmp_path / "gpu_check.log").read_text()


TINY_MAE = ("model.encoder=vit_tiny_patch16_224", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
            "run.cpu=true", 'run.mixed_precision="no"', "run.compile_backend=eager")  # fmt: skip
"""The ViT-B/16 recipe shrunk to seconds on the CPU; compiled with dynamo's "eager" backend (no code generation)."""


def test_mae_benchmark_times_the_trainers_step_in_every_mode(tmp_path, monkeypatch):
    # The GPU measurement's code path on the CPU: batches, FLOP count, timing, profile, rows, saved JSON; and
    # every step it takes is radstream.train.mae_step.train_step on the recipe's MAE (seed, gradient clipping).
    import torch

    from radstream.gpu.mae import MaeSize, run_mae
    from radstream.train import mae_step
    from radstream.train.mae import MAE

    calls = []
    real_step = mae_step.train_step

    def spy(accelerator, model, optimizer, batches, **kw):
        calls.append(
            (
                type(accelerator.unwrap_model(model, keep_torch_compile=False)),
                kw["grad_clip"],
                kw["seed"],
                len(batches),
            )
        )
        return real_step(accelerator, model, optimizer, batches, **kw)

    monkeypatch.setattr(mae_step, "train_step", spy)
    size = MaeSize(batch=1, steps=1, compiled_smart=False, overrides=TINY_MAE)
    reset_accelerate()
    try:
        run_mae(tmp_path / "mae.json", size, None)
    finally:
        reset_accelerate()
    # per mode: one FLOP-counting step per batch, two warm-up passes, the timed steps, one profiled step
    assert len(calls) == (2 + 4 + 1 + 1) * 2 + (4 + 8 + 1 + 1)
    assert set(calls) == {(MAE, 3.0, 0, 1)}  # the recipe's grad_clip and seed, one micro-batch per step
    result = json.loads((tmp_path / "mae.json").read_text())
    assert (result["recipe"], result["precision"]) == ("vit_b16_224.yaml", "no")
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["fixed 224, eager", "fixed 224, compiled", "smart bins + border-aware, eager"]
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0 and r["mfu"] is None
        assert r["attention"] in ("flash", "memory-efficient", "cudnn", "math")
    assert rows["fixed 224, eager"]["foreground_tokens_per_s"] is None
    assert rows["smart bins + border-aware, eager"]["foreground_tokens_per_s"] > 0
    # Border-aware masking skips the black border: fewer FLOPs per image than the full 224x224 letterbox.
    assert (
        rows["smart bins + border-aware, eager"]["gflops_per_image"]
        < rows["fixed 224, eager"]["gflops_per_image"]
    )
    assert "profile" in result
    # compiled as a run compiles: one static graph for the one 224 shape, no graph break
    assert (rows["fixed 224, compiled"]["graphs"], rows["fixed 224, compiled"]["graph_breaks"]) == (1, 0)
    assert rows["fixed 224, eager"]["graphs"] == 0
    assert torch.is_grad_enabled()


def test_resnet_benchmark_times_the_supervised_step(tmp_path, monkeypatch):
    # The ResNet part on the CPU: the recipe's network (shrunk), the real supervised step, a saved row.
    from radstream.gpu.bench import ResnetSize, run_resnet
    from radstream.train import supervised

    calls = []
    real_step = supervised.train_step

    def spy(accelerator, model, optimizer, batches, **kw):
        calls.append((kw["step"], kw["optim"].lr, kw["drop_padding"], len(batches[0]["key"])))
        return real_step(accelerator, model, optimizer, batches, **kw)

    monkeypatch.setattr(supervised, "train_step", spy)
    size = ResnetSize(
        batch=2,
        steps=2,
        side=64,
        overrides=("model.arch=resnet10t", "run.cpu=true", 'run.mixed_precision="no"'),
    )
    reset_accelerate()
    try:
        run_resnet(tmp_path / "resnet.json", size)
    finally:
        reset_accelerate()
    assert calls == [(i, 1e-3, True, 2) for i in range(3 + 2)]  # 3 warm-up steps, 2 timed; the recipe's rate
    result = json.loads((tmp_path / "resnet.json").read_text())
    assert result["model"] == "resnet10t, no" and (result["batch"], result["steps"]) == (2, 2)
    assert result["images_per_s"] > 0 and result["peak_mem_gib"] > 0


@pytest.mark.skipif(not dali_available(), reason="no nvidia.dali")
def test_decode_benchmark_rows_on_the_cpu_decoder(tmp_path):
    from radstream.gpu.data import run_decode

    run_decode(tmp_path / "d.json", batch=4, seconds=0.01, shapes=((32, 48),), device_id=None)
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [(r["codec"], r["shape"], r["hw_decoder"]) for r in rows] == [
        ("jpg", "32x48", "n/a"),
        ("png16", "32x48", "n/a"),
        ("jp2", "32x48", "n/a"),
    ]
    assert all(r["images_per_s"] > 0 and r["batch"] == 4 for r in rows)


def test_window_means_leave_out_the_first_window(tmp_path):
    from radstream.gpu.data import window_means

    rows = [{"split": "train", "images_per_s": 100.0, "data_wait_frac": 0.9},  # compilation
            {"split": "val", "loss": 1.0},
            {"split": "train", "images_per_s": 5000.0, "data_wait_frac": 0.02},
            {"split": "train", "images_per_s": 6000.0, "data_wait_frac": 0.04}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert window_means(tmp_path / "metrics.jsonl") == {
        "windows": 2,
        "images_per_s": 5500.0,
        "data_wait_frac": pytest.approx(0.03),
    }


def test_the_tests_part_collects_only_the_modules_with_gpu_tests():
    files = {Path(f).name for f in gpucheck.gpu_test_files(gpucheck.REPO / "tests")}
    assert {"test_gpu_decode.py", "test_loader.py", "test_pretrain.py", "test_supervised.py"} <= files
    assert "test_remote.py" not in files and "test_gpu.py" not in files

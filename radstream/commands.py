"""What each `radstream` command does; the parsers and the entry point are in ``radstream.cli``. Heavy modules
(torch, timm, the builder) are imported inside the command that needs them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _build_overrides(args: argparse.Namespace) -> list[str]:
    """Translate the convenience flags into dotted config overrides (explicit overrides win: they come last)."""
    flags = {
        "manifest_csv": "ingest.manifest_csv",
        "labels": "ingest.labels",
        "irma_csv": "ingest.irma_csv",
        "codec": "shards.codec",
        "strategy": "binning.strategy",
        "workers": "workers",
        "seed": "seed",
    }
    out = [f"source={args.source}", f"out={args.out}"]
    out += [
        f"{key}={getattr(args, name)}" for name, key in flags.items() if getattr(args, name, None) is not None
    ]
    if getattr(args, "keep_identifiers", False):
        out.append("ingest.privacy.enabled=false")
    return out + [_privacy_shorthand(o) for o in args.overrides]


def _privacy_shorthand(override: str) -> str:
    """``ingest.privacy=off|on`` (the documented opt-out) as the config's ``ingest.privacy.enabled``."""
    key, _, value = override.partition("=")
    if key.strip() == "ingest.privacy" and value.strip().lower() in ("off", "on", "false", "true"):
        return f"ingest.privacy.enabled={value.strip().lower() in ('on', 'true')}"
    return override


def _load_build_config(args: argparse.Namespace):
    from radstream.core.config import load_config
    from radstream.shards.builder.config import BuildConfig

    return load_config(BuildConfig, args.config, _build_overrides(args))


def _staging_folder(url: str) -> Path:
    """Local folder a build for a remote destination is written to before it is published."""
    import hashlib
    import os

    base = Path(os.environ.get("RADSTREAM_STAGING", Path.home() / ".cache" / "radstream" / "staging"))
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


def _check_out_folder(out: Path) -> None:
    """Fail in one line, before any work, when OUT cannot be a dataset folder we may write."""
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another OUT")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{out}: {existing} is a file, not a folder; choose another OUT")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: {existing} is not writable; choose another OUT")


def cmd_synth(args: argparse.Namespace) -> int:
    from radstream.ingest.synth import synthesize

    summary = synthesize(args.out, n=args.n, seed=args.seed, max_side=args.max_side, workers=args.workers)
    print(f"synth: {summary.get('n', args.n)} images in {args.out} ({summary.get('seconds', 0):.1f} s)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from radstream.shards.builder.parts import build_dataset
    from radstream.shards.builder.publish import publish
    from radstream.shards.transport import is_remote

    remote_out = args.out if is_remote(args.out) else None
    if remote_out:
        if args.num_tasks > 1:
            raise ValueError(
                f"{remote_out}: a multi-task build writes to a shared folder; publish it afterwards with "
                "`radstream publish OUT URL`"
            )
        args.out = str(_staging_folder(remote_out))
    _check_out_folder(Path(args.out))
    cfg = _load_build_config(args)
    start = time.perf_counter()
    manifest = build_dataset(cfg, args.task_index, args.num_tasks, force_replan=args.force_replan,
                             verify_source=args.verify_source, finalize_now=args.finalize)  # fmt: skip
    if manifest is None:
        print(
            f"build-shards: task {args.task_index} of {args.num_tasks} done; run `radstream finalize-shards` after all"
        )
        return 0
    _print_summary(manifest, time.perf_counter() - start, cfg.out)
    if remote_out:
        done = publish(
            cfg.out, remote_out, workers=max(cfg.workers, 4), allow_identifiers=args.allow_identifiers
        )
        print(
            f"published to {remote_out}: {done['uploaded']} files uploaded, {done['skipped']} already there"
        )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from radstream.shards.builder.publish import publish

    done = publish(args.out, args.url, workers=args.workers, allow_identifiers=args.allow_identifiers)
    print(
        f"published to {args.url}: {done['uploaded']} files uploaded, {done['skipped']} already there, "
        f"{done['bytes'] / 1e6:.1f} MB"
    )
    return 0


def _print_summary(manifest: dict, seconds: float, out: str | Path) -> None:
    from radstream.shards.builder.private import rejects_summary

    c = manifest["counts"]
    total_bytes = sum(s["bytes"] for b in manifest["bins"] for s in b["shards"])
    print(
        f"build-shards: {c['written']} written, {c['rejected']} rejected, {c['duplicates']} duplicates "
        f"(of {c['seen']} seen), {total_bytes / 1e6:.1f} MB in {len(manifest['bins'])} bins, {seconds:.1f} s"
    )
    for line in rejects_summary(out):
        print(line)
    if manifest.get("privacy", {}).get("identifiers") == "kept":
        print(f"build-shards: {manifest['privacy']['warning']}")


def cmd_finalize(args: argparse.Namespace) -> int:
    from radstream.shards.builder.finalize import finalize
    from radstream.shards.builder.plan import load_plan_config

    cfg = load_plan_config(args.out)
    start = time.perf_counter()
    _print_summary(finalize(cfg), time.perf_counter() - start, cfg.out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from radstream.shards.builder.verify import verify_shards

    report = verify_shards(args.out, quick=args.quick)
    for problem in report.problems[:50]:
        print(f"  {problem}")
    print(report.summary())
    return 0 if report.ok else 1


def cmd_bins(args: argparse.Namespace) -> int:
    from radstream.shards.builder.binreport import bins_report

    print(bins_report(args.path, args.overrides, batch_size=args.batch_size, workers=args.workers))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from radstream.demo import TINY, DemoSize, run_demo

    size = TINY if args.tiny else DemoSize()
    if args.n is not None:
        size = dataclasses.replace(size, images=args.n)
    return run_demo(args.out, size=size, seed=args.seed, workers=args.workers)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from radstream.gpu.check import main as gpu_check

    return gpu_check(args.out, quick=args.quick, budget_s=args.budget_s, peak_tflops=args.peak_tflops)


def cmd_study(args: argparse.Namespace) -> int:
    from radstream.study import make_protocol, run_study

    protocol = make_protocol(args.protocol, args.lrs, args.seeds, args.fractions)
    build = _build_overrides(args)[2:]  # the study places the shards in OUT/shards itself
    return run_study(args.source, args.out, protocol, build_overrides=build, seed=args.seed or 0,
                     workers=args.workers or 4)  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    """``radstream report``: print the markdown tables after writing them."""
    from radstream.report.report import write_report
    from radstream.report.report_mae import MAE_TITLE

    selections = write_report(args.run_dirs, args.out)
    text = (Path(args.out) / "results.md").read_text()
    print(text, end="")
    written = ["results.md"] + (["results.csv", "accuracy_vs_fraction.png"] if selections else [])
    written += ["pretrain.csv"] if f"## {MAE_TITLE}" in text else []
    print(f"report: {', '.join(written)} in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``radstream export``: the encoder of an MAE run as timm weights with its model card."""
    from radstream.report.export import BIN_TABLES, CARD, CONFIG_JSON, WEIGHTS, export

    config = export(
        args.run, args.out, results=args.results, shards=args.shards, force=args.force, fmt=args.format
    )
    rs = config["radstream"]
    print(
        f"export: {config['architecture']} encoder ({rs['weights']} weights, {rs['pos_embed']} positions, "
        f"img_size {config['model_args']['img_size']}) → {args.out}: {WEIGHTS}, {CONFIG_JSON}, {BIN_TABLES}, "
        f"{CARD}"
    )
    return 0

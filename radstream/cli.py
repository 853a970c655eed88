"""The `radstream` console script: datasets, the study, reports, and the training stages by name
(`radstream pretrain ...`, `accelerate launch -m radstream pretrain ...` on several GPUs)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from radstream.core.config import ConfigError
from radstream.core.perms import restrict_umask

log = logging.getLogger("radstream")

TRAINING_STAGES = {
    "pretrain": "radstream.train.pretrain",
    "supervised": "radstream.train.supervised",
    "finetune": "radstream.train.finetune",
    "embed": "radstream.eval.embed",
    "probe": "radstream.eval.probe",
}
"""`radstream STAGE ARGS` is `python -m MODULE ARGS`; under `accelerate launch -m radstream STAGE ARGS`
on every process."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


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
    if key.strip() == "radstream.ingest.privacy" and value.strip().lower() in ("off", "on", "false", "true"):
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


def cmd_export(args: argparse.Namespace) -> int:
    from radstream.report.export import cmd_export as run_export

    return run_export(args)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="an MAE run's encoder → timm weights, config.json and a model card")
    p.add_argument("run", help="MAE pretraining run folder (its best/ weights, else its latest checkpoint)")
    p.add_argument("out", help="export folder (must be empty unless --force)")
    p.add_argument(
        "--results",
        nargs="+",
        metavar="DIR",
        help="folders searched for probe / fine-tuning results of these weights (default: RUN's siblings)",
    )
    p.add_argument("--shards", help="the run's shard dataset, when it has moved since training")
    p.add_argument("--format", choices=["timm", "hf"], default="timm", help="timm (default); hf: not yet")
    p.add_argument("--force", action="store_true", help="overwrite the export's files in a non-empty OUT")
    p.set_defaults(func=cmd_export)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from radstream.gpucheck import main as gpu_check

    return gpu_check(args.out, quick=args.quick, budget_s=args.budget_s, peak_tflops=args.peak_tflops)


def _add_source_options(p) -> None:
    """The options of build-shards that say what the source holds and how it is built (study shares them)."""
    p.add_argument(
        "source",
        help="folder of DICOM/PNG/JPEG/TIFF files, or a CSV manifest; with --manifest-csv, the folder that "
        "sample names and folder labels are relative to",
    )
    p.add_argument(
        "--manifest-csv",
        help="CSV manifest: path[,label][,irma_code][,patient_id]; a relative path is read from the CSV's own "
        "folder (not from SOURCE)",
    )
    p.add_argument("--labels", choices=["none", "folder", "csv", "irma"], help="label source")
    p.add_argument("--irma-csv", help="IRMA code list (image_id;irma_code)")
    p.add_argument("--codec", help="jpg | png | png16 | jp2")
    p.add_argument("--strategy", choices=["fixed", "strict", "smart"], help="binning strategy")
    p.add_argument("--workers", type=int, help="worker processes")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--keep-identifiers",
        action="store_true",
        help="write raw patient ids and source paths (= ingest.privacy=off), for data that is public already",
    )


def cmd_study(args: argparse.Namespace) -> int:
    from radstream.study import make_protocol, run_study

    protocol = make_protocol(args.protocol, args.lrs, args.seeds, args.fractions)
    build = _build_overrides(args)[2:]  # the study places the shards in OUT/shards itself
    return run_study(args.source, args.out, protocol, build_overrides=build, seed=args.seed or 0,
                     workers=args.workers or 4)  # fmt: skip


def _add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="the whole study (shards → MAE → probes, baselines, fine-tuning → tables) "
                       "on your files, on this machine's GPUs or CPU")  # fmt: skip
    _add_source_options(p)
    p.add_argument("out", help="output folder (rerun the same command to resume)")
    p.add_argument("--protocol", choices=["full", "small", "tiny"], default="full",
                   help="full: the study's (ViT-B/16, 10 LRs, 3 seeds; for GPUs); small: the demo's models and "
                   "protocol, an hour or two on a few thousand images on a CPU; tiny: minutes, to try the "
                   "command")  # fmt: skip
    p.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates of the trained models (default: the protocol's)"
    )
    p.add_argument("--seeds", type=int, help="seeds per regime (default: the protocol's)")
    p.add_argument("--fractions", type=float, nargs="+", help="label fractions (default: 0.01 0.1 1)")
    p.add_argument("overrides", nargs="*", help="dotted build overrides, as build-shards")
    p.set_defaults(func=cmd_study)


def _add_build_parser(sub) -> None:
    p = sub.add_parser("build-shards", help="radiograph files → size-binned WebDataset shards")
    _add_source_options(p)
    p.add_argument("out", help="output dataset folder, or s3://bucket/prefix (built locally, then published)")
    p.add_argument("--config", help="YAML recipe (keys of radstream.shards.builder.config.BuildConfig)")
    p.add_argument("--task-index", type=int, default=0, help="this task's index (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=1, help="number of tasks (SLURM_ARRAY_TASK_COUNT)")
    p.add_argument(
        "--finalize", action="store_true", help="with --num-tasks > 1: also finalize (all parts done)"
    )
    p.add_argument(
        "--force-replan",
        action="store_true",
        help="the source or the options changed since OUT was planned: drop the old build (finished or not) "
        "and rebuild it (one task only)",
    )
    p.add_argument(
        "--verify-source",
        action="store_true",
        help="also hash every source file's bytes, to see files rewritten in place with the same size and "
        "modification time (the default check compares names, sizes and mtimes only)",
    )
    p.add_argument(
        "--allow-identifiers",
        action="store_true",
        help="with an s3:// OUT and --keep-identifiers: publish the identifiers too",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. binning.num_bins=6")
    p.set_defaults(func=cmd_build)


def _add_dataset_parsers(sub) -> None:
    """finalize-shards, publish, verify-shards: commands on a built dataset."""
    p = sub.add_parser("finalize-shards", help="merge the parts of a multi-task build into the manifest")
    p.add_argument("out")
    p.set_defaults(func=cmd_finalize)

    p = sub.add_parser("publish", help="upload a finished shard dataset to s3:// (manifest last)")
    p.add_argument("out", help="local finished dataset")
    p.add_argument("url", help="destination, e.g. s3://bucket/prefix (endpoint: $RADSTREAM_S3_ENDPOINT)")
    p.add_argument("--workers", type=int, default=8, help="parallel uploads")
    p.add_argument(
        "--allow-identifiers",
        action="store_true",
        help="publish a dataset built with identifiers kept (ingest.privacy=off): public data only",
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("verify-shards", help="re-read every shard and check it against the manifest")
    p.add_argument("out")
    p.add_argument("--quick", action="store_true", help="decode a 5%% sample of the images instead of all")
    p.set_defaults(func=cmd_verify)


def make_parser() -> argparse.ArgumentParser:
    stages = ", ".join(TRAINING_STAGES)
    parser = argparse.ArgumentParser(
        prog="radstream",
        description=__doc__,
        epilog=f"training stages ({stages}): radstream STAGE --help; on several GPUs "
        "accelerate launch -m radstream STAGE ...",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic radiograph corpus (the embedded default data)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=2500)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_synth)

    _add_build_parser(sub)
    _add_study_parser(sub)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic radiographs, end to end")
    p.add_argument("out", nargs="?", default="demo_out")
    p.add_argument("--n", type=int, help="synthetic images (default 700; 80 with --tiny)")
    p.add_argument(
        "--tiny", action="store_true", help="a minute-long run with tiny sizes (what the tests run)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_demo)

    _add_dataset_parsers(sub)

    p = sub.add_parser("gpu-check", help="run the GPU tests and benchmarks into one report (needs CUDA)")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.md, .json and .log")
    p.add_argument("--quick", action="store_true", help="small batches and few steps: about 4 minutes")
    p.add_argument("--budget-s", type=float, default=480.0, help="overall time limit in seconds")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by device name)")
    p.set_defaults(func=cmd_gpu_check)

    from radstream.report.report import add_report_parser

    add_report_parser(sub)

    _add_export_parser(sub)

    p = sub.add_parser("bins", help="print the bin plan of a source folder or a shard dataset")
    p.add_argument("path", help="source folder, or a shard dataset (has manifest.json)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="report images in bins that cannot fill a batch"
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="binning overrides, e.g. binning.strategy=strict")
    p.set_defaults(func=cmd_bins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `radstream` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_STAGES:
        import importlib

        return int(importlib.import_module(TRAINING_STAGES[argv[0]]).main(argv[1:]) or 0)
    parser = make_parser()
    # argparse fills a trailing nargs="*" positional at its first chance, so `key=value` overrides written after
    # options arrive as unknown arguments: take them back as overrides.
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    _setup_logging(args.verbose)
    restrict_umask()  # datasets, runs, caches: not readable by other users (radstream.core.perms)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, OSError, ValueError) as err:  # bad input or config; DatasetError is a ValueError
        if args.verbose:
            raise
        why = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else err
        print(f"radstream {args.command}: error: {why}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

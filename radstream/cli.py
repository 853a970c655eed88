"""The `radstream` console script: datasets, the study, reports, and the training stages by name
(`radstream pretrain ...`, `accelerate launch -m radstream pretrain ...` on several GPUs)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from radstream import commands
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
    p.set_defaults(func=commands.cmd_export)


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
    p.set_defaults(func=commands.cmd_study)


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
    p.set_defaults(func=commands.cmd_build)


def _add_dataset_parsers(sub) -> None:
    """finalize-shards, publish, verify-shards: commands on a built dataset."""
    p = sub.add_parser("finalize-shards", help="merge the parts of a multi-task build into the manifest")
    p.add_argument("out")
    p.set_defaults(func=commands.cmd_finalize)

    p = sub.add_parser("publish", help="upload a finished shard dataset to s3:// (manifest last)")
    p.add_argument("out", help="local finished dataset")
    p.add_argument("url", help="destination, e.g. s3://bucket/prefix (endpoint: $RADSTREAM_S3_ENDPOINT)")
    p.add_argument("--workers", type=int, default=8, help="parallel uploads")
    p.add_argument(
        "--allow-identifiers",
        action="store_true",
        help="publish a dataset built with identifiers kept (ingest.privacy=off): public data only",
    )
    p.set_defaults(func=commands.cmd_publish)

    p = sub.add_parser("verify-shards", help="re-read every shard and check it against the manifest")
    p.add_argument("out")
    p.add_argument("--quick", action="store_true", help="decode a 5%% sample of the images instead of all")
    p.set_defaults(func=commands.cmd_verify)


def add_report_parser(subparsers) -> None:
    """Add ``report`` to the ``radstream`` console script (``subparsers`` from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "report", help="probe, supervised and MAE pretraining runs → the study's result tables"
    )
    p.add_argument("run_dirs", nargs="+", help="run folders (searched recursively) or result files")
    outputs = "results.md, results.csv, accuracy_vs_fraction.png, pretrain.csv"
    p.add_argument("--out", required=True, help=f"folder for {outputs}")
    p.set_defaults(func=commands.cmd_report)


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
    p.set_defaults(func=commands.cmd_synth)

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
    p.set_defaults(func=commands.cmd_demo)

    _add_dataset_parsers(sub)

    p = sub.add_parser("gpu-check", help="run the GPU tests and benchmarks into one report (needs CUDA)")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.md, .json and .log")
    p.add_argument("--quick", action="store_true", help="small batches and few steps: about 4 minutes")
    p.add_argument("--budget-s", type=float, default=480.0, help="overall time limit in seconds")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by device name)")
    p.set_defaults(func=commands.cmd_gpu_check)

    add_report_parser(sub)

    _add_export_parser(sub)

    p = sub.add_parser("bins", help="print the bin plan of a source folder or a shard dataset")
    p.add_argument("path", help="source folder, or a shard dataset (has manifest.json)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="report images in bins that cannot fill a batch"
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="binning overrides, e.g. binning.strategy=strict")
    p.set_defaults(func=commands.cmd_bins)
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

"""How every stage is entered and stopped: exit codes, the stop signal, the stop marker for job scripts, and
``stage_main`` (``--config`` + stage flags + dotted ``key=value`` overrides → ``run(cfg)``)."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from radstream.core.atomic import write_json
from radstream.shards.layout import DatasetError
from radstream.shards.transport import RemoteError
from radstream.train.steps import NonFiniteLossError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_NON_FINITE, EXIT_BAD_CONFIG, EXIT_BAD_INPUT, EXIT_REQUEUE = 0, 1, 2, 3, 124
"""Exit codes of the stages: done, non-finite loss, bad config, bad input (a dataset or folder that cannot be
used: missing, not a dataset, corrupt, unwritable), stopped by a signal (requeue)."""
USER_ERRORS = (
    DatasetError,
    RemoteError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
)
"""Mistakes in what a user pointed the stage at (a host that cannot be reached too): one line, no traceback."""
STOPPED = "stopped.json"
"""Written when a signal stopped the run (requeue it); removed when the run starts again."""


class StopSignal:
    """Context manager: SIGTERM or SIGUSR1 sets ``requested``; the loop finishes its step, checkpoints and
    exits with code 124 (SLURM requeues on it). The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def clear_stopped(accelerator: Accelerator, run_dir: str | os.PathLike[str]) -> None:
    """Remove an earlier stop's ``stopped.json`` (main process): only a stop of this launch counts."""
    if accelerator.is_main_process:
        (Path(run_dir) / STOPPED).unlink(missing_ok=True)


def mark_stopped(
    accelerator: Accelerator, stop: StopSignal, run_dir: str | os.PathLike[str], step: int
) -> None:
    """Log the stop and leave ``run_dir/stopped.json`` (main process), after the checkpoint of ``step``.

    Launchers that do not pass the workers' code 124 on (torchrun exits 1 when a worker fails) still let
    the job script see it should requeue.
    """
    got = f"signal {stop.signum} here" if stop.requested else "signal on another rank"
    logger.warning("stopped at step %d (%s), checkpoint written; exit %d", step, got, EXIT_REQUEUE)
    if accelerator.is_main_process:
        marker = {"step": step, "exit_code": EXIT_REQUEUE, "time": time.time()}
        write_json(Path(run_dir) / STOPPED, marker, indent=None)


@dataclass(frozen=True)
class Flag:
    """A stage's own command-line flag, turned into the config override ``key=<format of the value>``."""

    name: str
    """The flag, e.g. "--shards"."""
    key: str
    """The config key it sets."""
    help: str
    required: bool = False
    template: str = "{}"
    """How the value becomes the override's value, e.g. "[{}]" for a comma-separated list."""


def stage_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    config_cls: type,
    run: Callable[[object], int],
    example_recipe: str,
    example_override: str,
    flags: Sequence[Flag] = (),
) -> int:
    """The thin entry point of every stage: ``--config`` + the stage's ``flags`` + ``key=value`` overrides →
    ``run(cfg)``. Flags are overrides too (before the free ones, which thus win).

    Returns the exit code: ``run``'s, ``EXIT_BAD_CONFIG`` for a config that does not load, ``EXIT_NON_FINITE``
    when the loss stops being finite, ``EXIT_BAD_INPUT`` for a dataset or folder that cannot be used
    (one line, no traceback).
    """
    import argparse

    from radstream.core.config import ConfigError, load_config
    from radstream.core.perms import restrict_umask

    restrict_umask()  # runs, embeddings, node caches: not readable by other users (radstream.core.perms)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for flag in flags:
        parser.add_argument(flag.name, dest=flag.key, required=flag.required, help=flag.help)
    parser.add_argument("--config", help=f"recipe YAML, e.g. {example_recipe}")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example_override}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    given = [f for f in flags if getattr(args, f.key) is not None]
    overrides = [f"{f.key}={f.template.format(getattr(args, f.key))}" for f in given] + args.overrides
    try:
        cfg = load_config(config_cls, args.config, overrides)
    except ConfigError as err:
        logger.error("bad config: %s", err)
        return EXIT_BAD_CONFIG
    try:
        return run(cfg)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return EXIT_NON_FINITE
    except USER_ERRORS as err:
        logger.error("%s", one_line(err))
        return EXIT_BAD_INPUT


def one_line(err: BaseException) -> str:
    """An error as one line naming the path: an ``OSError`` as "path: reason", and the original message of an
    error re-raised from a DataLoader worker (torch puts the worker's traceback into the message)."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(err):
        return lines[-1].split(": ", 1)[-1]  # "module.Error: message" → the message
    return lines[0] if lines else type(err).__name__

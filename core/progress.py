"""Progress bars for long stages: tqdm on stderr with rates and ETAs, main process only, and quiet where no one
watches (stderr not a terminal: logs, tests, job files) unless ``RADSTREAM_PROGRESS=1`` forces them on
(``RADSTREAM_PROGRESS=0`` turns them off everywhere)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

ENV = "RADSTREAM_PROGRESS"


def progress_enabled(main_process: bool = True) -> bool:
    """Whether bars are shown: the main process, and a terminal on stderr or ``RADSTREAM_PROGRESS=1``."""
    forced = os.environ.get(ENV, "")
    if not main_process or forced == "0":
        return False
    return forced == "1" or sys.stderr.isatty()


def progress(iterable=None, *, main_process: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr (``kwargs`` as tqdm's: total, desc, unit, unit_scale, initial), disabled as
    ``progress_enabled`` says."""
    return tqdm(
        iterable, file=sys.stderr, disable=not progress_enabled(main_process), dynamic_ncols=True, **kwargs
    )

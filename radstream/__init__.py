"""radstream: every package of the project under one import name.

The repository keeps its rooms as top-level folders (ingest/, bucketing/, shards/, train/, eval/, report/,
core/: the design card's layout); the wheel installs them as ``radstream.ingest``, ``radstream.train``, ... so
that no bare ``core`` or ``train`` lands in site-packages (pyproject's package-dir). From a checkout (an
editable install, pytest, ``python -m radstream.train.pretrain`` in the repository) the same names are found
here: the checkout's root joins this package's search path, so ``radstream.train`` is ``<checkout>/train``.
This module imports nothing else: every level of the project imports it first.
"""

from pathlib import Path as _Path

ROOMS = ("core", "ingest", "bucketing", "shards", "train", "eval", "report")
"""The project's packages below ``radstream`` (each a top-level folder of the checkout), lowest level first."""

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "core").is_dir() and (_checkout / "core" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's own __path__)

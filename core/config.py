"""Config loading shared by every stage: defaults → recipe file → dotted CLI overrides.

Each stage declares one frozen dataclass (with nested dataclasses for sub-configs). ``load_config`` builds an
OmegaConf structured config from it, so unknown keys and wrong types are errors, merges a YAML recipe and
``key=value`` overrides on top, and returns a real instance of the dataclass (its ``__post_init__`` checks run).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the stage's config."""


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Resolve a stage config.

    Args:
        cls: the stage's config dataclass.
        recipe: optional YAML file; its keys must exist in ``cls``.
        overrides: dotted ``key=value`` strings applied last, e.g. ``optim.lr=1e-3``.

    Returns:
        An instance of ``cls`` with every value resolved.

    Raises:
        ConfigError: unknown key, wrong type, unreadable recipe or a failed ``__post_init__`` check.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        merged = OmegaConf.structured(cls)
        if recipe is not None:
            merged = OmegaConf.merge(merged, _load_recipe(Path(recipe)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{recipe}: {_first_line(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(recipe, err)) from None
    for override in overrides:  # one at a time, so an error names the override, not the recipe
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {override!r}: {_first_line(err)}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {override!r}: {_yaml_problem(None, err)}") from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_first_line(err)) from None
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


def _load_recipe(path: Path) -> Any:
    """The recipe as an OmegaConf mapping, read as UTF-8 text by us, so that bytes of another encoding or a
    top level that is not a mapping (a list, a bare word) are one line naming the file, not a traceback.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, or its top level is not a mapping.
        yaml.YAMLError: a YAML syntax error (``load_config`` names its line).
    """
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    top = yaml.safe_load(text)
    if top is not None and not isinstance(top, dict):
        raise ConfigError(
            f"{path}: the recipe's top level is a {type(top).__name__}, not a mapping of keys (key: value lines)"
        )
    return OmegaConf.load(io.StringIO(text))


def _yaml_problem(recipe: str | Path | None, err: yaml.YAMLError) -> str:
    """A YAML syntax error as ``file:line: problem`` (PyYAML's own message spans several lines); for an
    override (no file), the problem alone."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if recipe is None:
        return f"not valid YAML: {problem}"
    where = f"{recipe}:{mark.line + 1}" if mark is not None else str(recipe)
    return f"{where}: YAML syntax error: {problem}"


def _first_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's message in one line; an unknown key as "no such key 'k' in parent"."""
    full_key = getattr(err, "full_key", None)
    if isinstance(err, ConfigKeyError) and full_key:
        parent, _, key = str(full_key).rpartition(".")
        return f"no such key {key!r} in {parent or 'the config'}"
    return str(err).splitlines()[0]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-friendly dict of a config dataclass (paths and tuples become str and list)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, for ``config.yaml`` in a run directory and in checkpoints."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def flat_hparams(tree: dict, prefix: str = "") -> dict:
    """A nested config as flat TensorBoard hyperparameters (lists and None as strings)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out

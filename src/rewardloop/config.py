"""Resolve a command's frozen config dataclass from defaults, a YAML file and CLI flags.

Precedence: dataclass defaults < ``--config FILE.yaml`` < flags given on the command line.
Unknown keys in the YAML are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rewardloop.errors import UserError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn YAML scalars into the field's type where YAML is ambiguous (paths, tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key) if len(non_none) == 1 else value
    if annotation is Path:
        return Path(value)
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(value)
    return value


def load_config(cls: type[T], config_file: Path | None = None, **flags: Any) -> T:
    """Build ``cls`` from its defaults, an optional YAML file and the non-None ``flags``.

    Raises UserError for a missing/invalid YAML file, unknown keys or values the dataclass's
    ``__post_init__`` rejects (it raises ValueError, turned into a UserError here).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise UserError(f"{path}: expected a mapping of config keys, got {kind}")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise UserError(f"{path}: unknown config keys {unknown}; known: {sorted(fields)}")
        values.update({k: _coerce(v, hints[k], k) for k, v in loaded.items()})
    for key, value in flags.items():
        if key not in fields:
            raise TypeError(f"{cls.__name__} has no field {key!r}")
        if value is not None:
            values[key] = _coerce(value, hints[key], key)
    missing = [f"--{name.replace('_', '-')}" for name, f in fields.items()
               if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: give the flag, or the key in a "
                        "--config file")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid {cls.__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return config_to_dict(v)
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}

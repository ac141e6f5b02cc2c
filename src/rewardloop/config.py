"""Resolve a command's frozen config dataclass from defaults, a YAML file and CLI flags.

Precedence: dataclass defaults < ``--config FILE.yaml`` < flags given on the command line.
A key is a field's name or, where its flag is spelled otherwise (a config's ``FLAG_NAMES``:
``--reward`` for ``rewards``), that flag's name with ``_``; both spellings at once are an error.
Unknown keys in the YAML are an error (a typo must not silently fall back to a default), and so
is a value of the wrong type (``overwrite: "false"`` is a string, and a non-empty string is
true): every value is checked against its field's annotation (``check_value``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rewardloop.errors import UserError

T = TypeVar("T")

# PyYAML reads YAML 1.1, where a number needs a dot to be a float: `lr: 1e-4` arrives as the
# string "1e-4" (and `max_steps: 1e3` as "1e3"). A float field takes a numeric string as the
# number it spells; an int field only that exponent form (a quoted "4" is refused).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"),
          Path: ("a path (a string)", "paths")}
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "a mapping"}


def _type_name(annotation: Any, plural: bool = False) -> str:
    """How ``annotation`` reads in an error message."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [_type_name(a, plural) for a in args if a is not type(None)]
        return " or ".join(rest) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        return "a list of " + (_type_name(args[0], plural=True) if args else "values")
    if origin in (dict, Mapping):
        return "a mapping" + (f" of {_type_name(args[1], plural=True)}"
                              if len(args) == 2 and args[1] is not Any else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation in _NAMES:
        return _NAMES[annotation][plural]
    return getattr(annotation, "__name__", str(annotation))


def _wrong(key: str, value: Any, annotation: Any, hint: str = "") -> UserError:
    if value is None:
        shown = "null"
    elif isinstance(value, float) and math.isnan(value):
        shown = "nan"
    else:
        shown = f"{value!r} ({_KINDS.get(type(value), type(value).__name__)})"
    return UserError(f"{key}: expected {_type_name(annotation)}, got {shown}{hint}")


def _check_number(value: Any, annotation: type, key: str) -> int | float:
    """An int or float setting; a bool is not a number here, nor is NaN."""
    number = value
    if isinstance(value, str) and (_EXPONENT if annotation is int else _NUMBER).fullmatch(value):
        number = float(value)
    if isinstance(number, bool) or not isinstance(number, int | float):
        hint = "; a quoted number is a string: remove the quotes" if isinstance(
            value, str) and _NUMBER.fullmatch(value) else ""
        raise _wrong(key, value, annotation, hint)
    if math.isnan(number):
        raise _wrong(key, value, annotation)
    if annotation is float:
        return float(number)
    if isinstance(number, float):
        if not number.is_integer():
            raise _wrong(key, value, annotation, "; it has a fractional part")
        return int(number)
    return number


def _check_items(value: Any, annotation: Any, key: str) -> Any:
    """A tuple, list or mapping setting, item by item."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong(key, value, annotation)
        k_type, v_type = args or (Any, Any)
        return {check_value(k, k_type, f"{key} key"): check_value(v, v_type, f"{key}.{k}")
                for k, v in value.items()}
    if not isinstance(value, list | tuple):
        raise _wrong(key, value, annotation)
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        items = [check_value(v, args[0] if args else Any, f"{key}[{i}]")
                 for i, v in enumerate(value)]
    else:
        if len(value) != len(args):
            raise UserError(f"{key}: expected {len(args)} items, got {list(value)!r}")
        items = [check_value(v, a, f"{key}[{i}]")
                 for i, (v, a) in enumerate(zip(value, args, strict=True))]
    return tuple(items) if origin is tuple else items


def check_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as a setting of type ``annotation`` (a field's resolved type hint): bool,
    int, float, str, Path, Optional, Literal, tuple/list of X, mapping of X to Y.

    Converts only where the value is unambiguous: a YAML int to float, an integral float to
    int, a YAML 1.1 exponent string ("1e-4") to its number, a string to a Path. Raises a
    UserError naming ``key``, the value and the type expected for anything else.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return check_value(value, rest[0], key)
        for option in rest:
            with contextlib.suppress(UserError):
                return check_value(value, option, key)
        raise _wrong(key, value, annotation)
    if value is None:
        raise _wrong(key, value, annotation, "; leave the key out for the default")
    if origin is typing.Literal:
        if value not in args:
            raise _wrong(key, value, annotation)
        return value
    if origin is not None:
        return _check_items(value, annotation, key)
    return _check_scalar(value, annotation, key)


def _check_scalar(value: Any, annotation: Any, key: str) -> Any:
    """A bool, int, float, str, Path or other class setting (not None)."""
    if annotation in (int, float):
        return _check_number(value, annotation, key)
    if annotation is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if annotation is Path and isinstance(value, str | os.PathLike):
        return Path(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise _wrong(key, value, annotation)
    return value


def _takes_null(annotation: Any) -> bool:
    """Whether None is a value of ``annotation`` (Optional, or Any)."""
    args = typing.get_args(annotation)
    return annotation is Any or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                 and type(None) in args)


def flag_names(cls: type) -> dict[str, str | tuple[str, ...]]:
    """The flags of dataclass ``cls``'s fields that are not spelled ``--field-name``: the
    ``FLAG_NAMES`` of ``cls`` and its bases (field -> a flag, several as a tuple, a switch as
    ``"--on/--off"``)."""
    names: dict[str, str | tuple[str, ...]] = {}
    for klass in reversed(cls.__mro__):
        names |= klass.__dict__.get("FLAG_NAMES", {})
    return names


def key_aliases(cls: type) -> dict[str, str]:
    """``{key: field}``: the other config keys of ``cls``'s fields, each a long flag of
    ``flag_names`` with ``_`` (``--reward`` -> ``reward``; of a switch its "on" name)."""
    aliases = {}
    for name, flags in flag_names(cls).items():
        for flag in (flags,) if isinstance(flags, str) else flags:
            key = flag.split("/")[0].removeprefix("--").replace("-", "_")
            if flag.startswith("--") and key != name:
                aliases[key] = name
    return aliases


def _field_keys(cls: type, values: Mapping[Any, Any], where: str) -> dict[Any, Any]:
    """``{field name: key given}`` for the keys of ``values`` (an alias, ``key_aliases``, to its
    field's name; any other key to itself); a UserError naming both keys when a field is given
    under two."""
    aliases = key_aliases(cls)
    given: dict[Any, Any] = {}
    for key in values:
        name = aliases.get(key, key) if isinstance(key, str) else key
        if name in given:
            raise UserError(f"{where}: {given[name]!r} and {key!r} are one setting ({name}); "
                            "give one of them")
        given[name] = key
    return given


OTHER_NAMES = {
    "save_steps": "save_every", "logging_steps": "log_every", "eval_steps": "eval_every",
    "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs", "lr_scheduler_type": "schedule",
    "model_name_or_path": "model", "max_completion_length": "max_new_tokens",
    "resume_from_checkpoint": "resume", "num_iterations": "ppo_epochs", "epsilon": "clip_eps",
    "cliprange": "clip_eps"}
"""transformers/TRL option names (and older ones) -> ours with the same meaning and unit, to
name in an unknown-key error (not per-device batch sizes, a warm-up ratio or output_dir,
whose counterparts here mean something else)."""


def _with_hint(key: str, known: set[str]) -> str:
    """``key`` as an unknown-key error names it, with the known key it probably means."""
    guess = OTHER_NAMES.get(key.replace("-", "_"))
    if guess not in known:
        close = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=1, cutoff=0.75)
        guess = close[0] if close else None
    return f"{key!r} (did you mean {guess!r}?)" if guess else repr(key)


def check_fields(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` (field name or its flag's name, ``key_aliases`` -> value) checked against
    dataclass ``cls`` and keyed by field name: unknown keys, a field under two names and values
    of the wrong type are a UserError beginning with ``where``. A ``null`` for a setting that
    cannot be null leaves it at its default (as leaving the key out does)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    given = _field_keys(cls, values, where)
    unknown = sorted((key for name, key in given.items() if name not in known), key=str)
    if unknown:
        named = "[" + ", ".join(_with_hint(str(key), known) for key in unknown) + "]"
        raise UserError(f"{where}: unknown keys {named}; known: {sorted(known)}")
    out = {}
    for name, key in given.items():
        value = values[key]
        if value is None and not _takes_null(hints[name]):
            continue  # a YAML `null` on a setting that has no null value: its default
        try:
            out[name] = check_value(value, hints[name], key)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    return out


def load_config(cls: type[T], config_file: Path | None = None, **flags: Any) -> T:
    """Build ``cls`` from its defaults, an optional YAML file and the non-None ``flags``.

    Raises UserError for a missing/invalid YAML file, unknown keys, values of the wrong type
    (``check_value``) or values the dataclass's ``__post_init__`` rejects (it raises ValueError,
    turned into a UserError here).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise UserError(f"config file {path} is a directory; give a YAML file")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise UserError(f"{path}: expected a mapping of config keys, got {kind}")
        values.update(check_fields(cls, loaded, str(path)))
    for key, value in flags.items():
        if key not in fields:
            raise TypeError(f"{cls.__name__} has no field {key!r}")
        if value is not None:
            values[key] = check_value(value, hints[key], key)
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

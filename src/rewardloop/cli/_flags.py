"""Command-line flags made from a command's config dataclass.

Every field of the config becomes a flag (``--field-name``; a boolean is ``--x/--no-x``, a tuple
a repeatable flag) whose help is the field's docstring and default (``options.flag_help``). The
flags default to None, meaning "not given", so that a value from ``--config FILE.yaml`` is kept
unless the flag is on the command line; ``config.load_config`` then applies the precedence
defaults < YAML < flags. A field is therefore declared, documented and defaulted in one place,
and a new field is a new flag with nothing to add here.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from rewardloop.cli._common import CONFIG
from rewardloop.cli._launch import NPROC, refuse_nproc
from rewardloop.config import flag_names
from rewardloop.engines.options import EngineOptions
from rewardloop.options import (
    ClusterOptions,
    LoraOptions,
    ModelOptions,
    OfflineOptions,
    OptimOptions,
    RayJobOptions,
    RayOptions,
    RunOptions,
    RuntimeOptions,
    field_docs,
    flag_help,
)

# Where a block's flags appear in --help, after the command's own.
BLOCK_ORDER: tuple[type, ...] = (RunOptions, OfflineOptions, OptimOptions, ModelOptions,
                                 LoraOptions, RuntimeOptions, EngineOptions, RayOptions,
                                 RayJobOptions, ClusterOptions)
SCALARS = (str, int, float, Path)
METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH"}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _declaring_block(cls: type, name: str) -> type:
    """The most basic class in ``cls``'s MRO that declares field ``name`` (a redeclaration
    that only changes the default does not move the flag)."""
    owners = [k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {})]
    return owners[-1]


def _order(cls: type, name: str, index: int) -> tuple[int, int]:
    block = _declaring_block(cls, name)
    rank = BLOCK_ORDER.index(block) + 1 if block in BLOCK_ORDER else 0
    return rank, index


def _flag_type(cls: type, name: str, hint: Any) -> tuple[Any, str | None]:
    """(the annotation typer parses the flag with, its metavar: None for a boolean switch,
    "TEXT ..." for a repeatable flag)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{cls.__name__}.{name}: no flag for the union {hint}")
        return _flag_type(cls, name, rest[0])
    if hint is bool:
        return Optional[bool], None  # noqa: UP045 (typer reads typing.Optional)
    if origin is tuple and args and args[0] in SCALARS:
        item = args[0]
        return Optional[list[item]], f"{METAVARS[item]} ..."  # type: ignore[valid-type]  # noqa: UP045
    if hint in SCALARS:
        return Optional[hint], METAVARS[hint]  # noqa: UP045
    raise TypeError(f"{cls.__name__}.{name}: no flag for type {hint}")


def config_params(cls: type, *, cli_defaults: Mapping[str, Any] | None = None,
                  skip: Sequence[str] = ()) -> list[inspect.Parameter]:
    """One typer parameter per field of config dataclass ``cls``, the command's own fields
    first, then each option block's.

    A field's flag is ``--field-name`` unless the config's ``FLAG_NAMES`` names it otherwise
    (``{"rewards": "--reward"}``, several as a tuple; for a switch both spellings,
    ``"--on/--off"``; ``config.flag_names``), and those names are also its keys in --config
    (``config.key_aliases``). ``cli_defaults`` gives a value used when the flag is absent (it
    then wins over the YAML file, so keep it for what the command itself means, like
    ``rloo``'s advantage); ``skip`` fields that are not flags (YAML only). Raises TypeError for
    a field without a docstring or of a type no flag can carry.
    """
    rename, cli_defaults = flag_names(cls), cli_defaults or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    ordered = sorted(enumerate(fields), key=lambda p: _order(cls, p[1].name, p[0]))
    params = []
    for _, field in ordered:
        if field.name not in docs:
            raise TypeError(f"{cls.__name__}.{field.name} has no docstring: it is the flag's "
                            "help, write one under the field")
        annotation, metavar = _flag_type(cls, field.name, hints[field.name])
        switch = metavar is None
        given = rename.get(field.name, flag_name(field.name))
        decls = (given,) if isinstance(given, str) else given
        if switch and "/" not in decls[0]:
            decls = (f"{decls[0]}/--no-{decls[0].removeprefix('--')}",)
        text = flag_help(cls, field.name, cli_defaults.get(field.name, dataclasses.MISSING))
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            text += f" Required: the flag or `{field.name}:` in --config."
        if metavar is not None and metavar.endswith("..."):
            text = "Repeatable. " + text
        option = typer.Option(cli_defaults.get(field.name), *decls, help=text,
                              show_default=False, metavar=metavar)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=annotation))
    return params


def config_command(cls: type, run: Callable[..., None], *, doc: str,
                   extra: Sequence[inspect.Parameter] = (),
                   cli_defaults: Mapping[str, Any] | None = None,
                   skip: Sequence[str] = (),
                   skip_if: Callable[..., bool] | None = None) -> Callable[..., None]:
    """A typer command whose flags are ``cls``'s fields (``config_params``), then ``extra``
    parameters that are not config fields, then ``--config``. It builds the config
    (defaults < YAML < flags) and calls ``run(cfg, **extra values)``; not at all when
    ``skip_if(**extra values)`` is true (a group's callback when a subcommand was asked for)."""
    params = config_params(cls, cli_defaults=cli_defaults, skip=skip)
    params += [*extra, inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY,
                                         default=CONFIG, annotation=Optional[Path])]  # noqa: UP045
    extra_names = [p.name for p in extra]

    def command(**values: Any) -> None:
        from rewardloop.config import load_config

        config = values.pop("config")
        extras = {name: values.pop(name) for name in extra_names}
        if skip_if is not None and skip_if(**extras):
            return
        flags = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        # An empty repeatable flag means "not given" (keep the YAML's list).
        flags = {k: (v if v != () else None) for k, v in flags.items()}
        run(load_config(cls, config, **flags), **extras)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = cls.__name__.removesuffix("Config").lower()
    return command


def train_command(cls: type, run: Callable[[Any], None], *, doc: str,
                  cli_defaults: Mapping[str, Any] | None = None) -> Callable[..., None]:
    """``config_command`` for a trainer: also ``--nproc`` (handled by ``cli.main`` before
    parsing; refused here if the command is called in-process)."""

    def run_trainer(cfg: Any, nproc: int | None) -> None:
        refuse_nproc(nproc)
        run(cfg)

    nproc = inspect.Parameter("nproc", inspect.Parameter.KEYWORD_ONLY, default=NPROC,
                              annotation=Optional[int])  # noqa: UP045
    return config_command(cls, run_trainer, doc=doc, extra=[nproc],
                          cli_defaults=cli_defaults)

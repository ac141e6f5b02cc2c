"""Every option of every command's config is documented, and every one is a flag.

The field docstrings are the one place an option is explained: the command line's flags and
their help are made from them (cli/_flags.py). A field without one fails here, and so does a
config field that is not a flag of its command or a flag whose help is empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.cli._flags import config_params
from rewardloop.cli.generate import GenerateConfig
from rewardloop.config import flag_names
from rewardloop.eval.config import EvalConfig
from rewardloop.loop_config import LoopConfig
from rewardloop.options import OptimOptions, field_docs
from rewardloop.tiny import TinyConfig
from rewardloop.train.configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig

CONFIGS = [SFTConfig, RewardConfig, DPOConfig, GRPOConfig, PPOConfig, GenerateConfig,
           EvalConfig, LoopConfig, TinyConfig]
# command path -> its config; the flags of these commands are made from the config.
COMMANDS = {("train", "sft"): SFTConfig, ("train", "rm"): RewardConfig,
            ("train", "dpo"): DPOConfig, ("train", "grpo"): GRPOConfig,
            ("train", "rloo"): GRPOConfig, ("train", "ppo"): PPOConfig,
            ("generate",): GenerateConfig, ("eval",): EvalConfig, ("tiny",): TinyConfig,
            ("loop",): LoopConfig}
# Defaults a command gives a field in place of the config's (``cli_defaults``).
COMMAND_DEFAULTS = {("train", "rloo"): {"advantage": "rloo"}}
# Nested option mappings: YAML keys only.
YAML_ONLY = {"rm_options", "policy_options", "generation"}
# Flags spelled otherwise than the field, for the names users already know (FLAG_NAMES).
RENAMED = {"data_format": "--format", "rewards": "--reward", "precompute_ref": "--ref-cached",
           "judges": "--judge", "n": "-n", "hidden_size": "--hidden", "num_layers": "--layers",
           "num_heads": "--heads"}
# The model a command trains or samples from: both spellings everywhere (as DESIGN.md says).
MODEL_FLAGS = {("train", "sft"): "model", ("train", "rm"): "model", ("train", "dpo"): "model",
               ("train", "grpo"): "policy", ("train", "rloo"): "policy",
               ("train", "ppo"): "policy", ("generate",): "policy", ("eval",): "policy"}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert missing == []


def _command(path: tuple[str, ...]) -> Any:
    """The click command at ``path`` (typer vendors click, so it is not imported here)."""
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_field_is_a_documented_flag(path: tuple[str, ...]) -> None:
    cls = COMMANDS[path]
    params = {p.name: p for p in _command(path).params}
    for field in dataclasses.fields(cls):
        if field.name in YAML_ONLY:
            assert field.name not in params
            continue
        param = params[field.name]
        assert RENAMED.get(field.name, "--" + field.name.replace("_", "-")) in param.opts
        named = flag_names(cls).get(field.name, ())
        for flag in (named,) if isinstance(named, str) else named:
            assert flag.split("/")[0] in param.opts, (field.name, flag)
        help_text = param.help or ""
        assert field_docs(cls)[field.name].split()[0] in help_text
        default = COMMAND_DEFAULTS.get(path, {}).get(field.name, field.default)
        if default not in (dataclasses.MISSING, None, ()) and not isinstance(default, bool):
            shown = '""' if default == "" else default
            assert f"Default: {shown}." in help_text, field.name
    assert "config" in params
    assert ("nproc" in params) == (path[0] == "train")


@pytest.mark.parametrize("path", list(MODEL_FLAGS), ids=" ".join)
def test_the_model_to_train_or_sample_is_both_model_and_policy(path: tuple[str, ...]) -> None:
    """`train grpo --model DIR` works as `train dpo --policy DIR` does, and --help shows both."""
    param = {p.name: p for p in _command(path).params}[MODEL_FLAGS[path]]
    assert {"--model", "--policy"} <= set(param.opts)
    shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output
    assert "--model" in shown and "--policy" in shown


def test_the_help_shows_each_command_default_not_the_block_one() -> None:
    lr = {p.name: p for p in _command(("train", "dpo")).params}["lr"]
    assert "Default: 1e-06." in (lr.help or "")
    assert OptimOptions.lr != DPOConfig.lr


def test_the_help_shows_the_default_the_command_runs_with() -> None:
    def help_of(path: tuple[str, ...], name: str) -> str:
        return {p.name: p for p in _command(path).params}[name].help or ""

    assert "Default: rloo." in help_of(("train", "rloo"), "advantage")
    assert "Default: grpo." in help_of(("train", "grpo"), "advantage")
    # An empty default is shown as one, not as "Default: ."
    assert help_of(("loop",), "batch_prefix").endswith('Default: "".')


def test_repeatable_flags_say_so_once() -> None:
    for path in COMMANDS:
        for param in _command(path).params:
            assert (param.help or "").lower().count("repeatable") <= 1, (path, param.name)


def test_a_default_is_said_once() -> None:
    """A help text that says "Default: x." gets no second "[default: x]" from typer."""
    for path in (*COMMANDS, ("score",), ("generate",)):
        for param in _command(path).params:
            if "Default:" in (param.help or ""):
                assert not getattr(param, "show_default", False), (path, param.name)


def test_a_field_without_a_docstring_is_refused() -> None:
    @dataclass(frozen=True, kw_only=True)
    class ToyConfig(OptimOptions):
        """A command's options."""

        steps: int = 10
        # a comment is not a docstring
        name: str = "x"
        """Run name."""

    assert "steps" not in field_docs(ToyConfig) and "name" in field_docs(ToyConfig)
    with pytest.raises(TypeError, match="ToyConfig.steps has no docstring"):
        config_params(ToyConfig)


def test_a_redeclared_default_keeps_the_block_docstring() -> None:
    @dataclass(frozen=True, kw_only=True)
    class ToyConfig(OptimOptions):
        """A command's options."""

        lr: float = 0.5

    params = {p.name: p for p in config_params(ToyConfig)}
    assert "Peak learning rate of AdamW. Default: 0.5." in params["lr"].default.help

"""Every config value a user gives is checked against its field before anything runs.

A value of the wrong type in a ``--config`` YAML, a number out of range (NaN included), a bad
key in the loop's trainer options or in a simulated pool: each is one line naming the key and
what is expected, exit 2 on the command line, never a traceback and never silently taken.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.config import check_value, load_config
from rewardloop.errors import UserError
from rewardloop.eval.config import EvalConfig
from rewardloop.feedback.simulate import load_pool, parse_pool
from rewardloop.loop_config import LoopConfig
from rewardloop.tiny import TinyConfig
from rewardloop.train.configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig

EXAMPLES = Path(__file__).parents[2] / "examples"
SFT = {"model": "m", "data": Path("sft.jsonl"), "out": Path("o")}
RL = {"policy": "p", "prompts": Path("x.jsonl"), "out": Path("o"), "rewards": ("a.b:c",)}
LOOP = {"policy": "p", "prompts": Path("x.jsonl")}
EVAL = {"policy": "p", "baseline": "b", "prompts": Path("x.jsonl"), "out": Path("o")}


def _yaml(tmp_path: Path, keys: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def _text(tmp_path: Path, text: str) -> Path:
    """A YAML file written as is: PyYAML reads ``1e-4`` (no dot) as a string."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# -- check_value: one field's value against its annotation -------------------------------------


@pytest.mark.parametrize(("value", "annotation", "expected"), [
    (True, bool, True),
    (3, float, 3.0),
    ("1e-4", float, 1e-4),  # YAML 1.1: no dot, so a string
    ("-2.5E+1", float, -25.0),
    (2.0, int, 2),
    ("1e3", int, 1000),
    (None, int | None, None),
    ("a.jsonl", Path, Path("a.jsonl")),
    (Path("m"), str, "m"),
    (["a", "b"], tuple[str, ...], ("a", "b")),
    ({"helpful": 1}, Mapping[str, float] | None, {"helpful": 1.0}),
    ("b", Literal["a", "b"], "b"),
])
def test_values_of_the_right_type_are_taken(value: Any, annotation: Any, expected: Any) -> None:
    got = check_value(value, annotation, "k")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("value", "annotation", "words"), [
    ("false", bool, "k: expected true or false, got 'false' (a string)"),
    (1, bool, "expected true or false, got 1"),
    ("fast", float, "k: expected a number, got 'fast'"),
    (math.nan, float, "k: expected a number, got nan"),
    (True, int, "expected an integer, got True"),
    (1.5, int, "expected an integer, got 1.5 (a number); it has a fractional part"),
    ("4", int, "a quoted number is a string: remove the quotes"),
    ("1.5e0", int, "fractional part"),
    (None, int, "expected an integer, got null; leave the key out for the default"),
    (["a"], Path, "expected a path (a string), got ['a'] (a list)"),
    (3, str, "expected a string, got 3"),
    ("wandb", tuple[str, ...], "expected a list of strings, got 'wandb'"),
    ([1], tuple[str, ...], "k[0]: expected a string, got 1"),
    ({"helpful": "x"}, Mapping[str, float] | None, "k.helpful: expected a number"),
    ("c", Literal["a", "b"], "expected one of 'a', 'b', got 'c'"),
])
def test_values_of_the_wrong_type_name_the_key_and_the_type(value: Any, annotation: Any,
                                                           words: str) -> None:
    with pytest.raises(UserError) as info:
        check_value(value, annotation, "k")
    assert words in str(info.value)


# -- load_config: the YAML file of a command ---------------------------------------------------


@pytest.mark.parametrize(("text", "words"), [
    ('overwrite: "false"\n', "overwrite: expected true or false, got 'false'"),
    ("packing: 'yes'\n", "packing: expected true or false, got 'yes'"),
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ('batch_size: "4"\n', "batch_size: expected an integer, got '4'"),
    ("max_steps: 1.5\n", "max_steps: expected an integer, got 1.5"),
    ("data: [sft.jsonl]\n", "data: expected a path"),
    ("report_to: tensorboard\n", "report_to: expected a list of strings"),
    ("lr: .nan\n", "lr: expected a number, got nan"),
])
def test_a_yaml_value_of_the_wrong_type_is_refused_by_key(tmp_path: Path, text: str,
                                                         words: str) -> None:
    with pytest.raises(UserError, match=words) as info:
        load_config(SFTConfig, _text(tmp_path, text), **SFT)
    assert str(info.value).startswith(str(tmp_path / "config.yaml"))


def test_a_config_that_is_a_directory_is_called_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"config file {tmp_path} is a directory"):
        load_config(SFTConfig, tmp_path, **SFT)
    with pytest.raises(UserError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "missing.yaml", **SFT)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("lr: 0.1  # réglé\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_config(SFTConfig, latin, **SFT)


def test_yaml_numbers_are_read_as_their_fields_type(tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, _text(tmp_path, "lr: 1e-4\nmax_steps: 2.0\nwarmup_steps: 1e1\n"
                                                 "weight_decay: 0\neval_data: null\n"), **SFT)
    assert (cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.weight_decay) == (1e-4, 2, 10, 0.0)
    assert type(cfg.max_steps) is int and type(cfg.weight_decay) is float
    assert cfg.eval_data is None


def test_a_yaml_null_leaves_a_setting_at_its_default(tmp_path: Path) -> None:
    """`key: null` on a setting that cannot be null means "unset", as leaving the key out:
    configs written that way before values were checked still load."""
    cfg = load_config(SFTConfig, _text(tmp_path, "lr: null\nmax_steps: null\n"), **SFT)
    default = load_config(SFTConfig, None, **SFT)
    assert (cfg.lr, cfg.max_steps) == (default.lr, default.max_steps)


# -- keys: the field's name, or the name of its flag --------------------------------------------


@pytest.mark.parametrize(("cls", "base", "text", "field", "value"), [
    (GRPOConfig, {**RL, "rewards": None}, "reward: [m.od:fn]\n", "rewards", ("m.od:fn",)),
    (PPOConfig, {**RL, "policy": None}, "model: sft\n", "policy", "sft"),
    (SFTConfig, {**SFT, "model": None}, "policy: sft\n", "model", "sft"),
    (RewardConfig, SFT, "format: ranking\n", "data_format", "ranking"),
    (DPOConfig, SFT, "format: kto\nloss: kto\n", "data_format", "kto"),
    (DPOConfig, SFT, "ref_cached: false\n", "precompute_ref", False),
    (EvalConfig, EVAL, "judge: [human]\nmodel: p\n", "judges", ("human",)),
    (TinyConfig, {"out": Path("t")}, "hidden: 32\nlayers: 1\nheads: 2\n", "num_heads", 2),
])
def test_a_config_key_may_be_the_flags_name(tmp_path: Path, cls: type, base: dict[str, Any],
                                            text: str, field: str, value: Any) -> None:
    """sft-rm.md: the keys are the flag names with `_`, also where the flag is not spelled as
    the field (`--reward` for `rewards`)."""
    flags = {k: v for k, v in base.items() if v is not None}
    assert getattr(load_config(cls, _text(tmp_path, text), **flags), field) == value


def test_a_flag_overrides_the_key_of_another_spelling(tmp_path: Path) -> None:
    cfg = load_config(GRPOConfig, _text(tmp_path, "reward: [a.b:yaml]\n"), **RL)
    assert cfg.rewards == ("a.b:c",)


@pytest.mark.parametrize(("cls", "base", "keys", "words"), [
    (GRPOConfig, RL, {"reward": ["a.b:c"], "rewards": ["a.b:d"]},
     "'reward' and 'rewards' are one setting (rewards)"),
    (DPOConfig, SFT, {"precompute_ref": True, "ref_cached": False},
     "'precompute_ref' and 'ref_cached' are one setting (precompute_ref)"),
    (EvalConfig, EVAL, {"judges": ["human"], "judge": ["human"]},
     "'judges' and 'judge' are one setting (judges)"),
])
def test_a_setting_under_both_names_is_refused(tmp_path: Path, cls: type, base: dict[str, Any],
                                               keys: dict[str, Any], words: str) -> None:
    with pytest.raises(UserError, match=re.escape(words)) as info:
        load_config(cls, _text(tmp_path, yaml.safe_dump(keys, sort_keys=False)), **base)
    assert str(info.value).startswith(str(tmp_path / "config.yaml"))


def test_the_loops_trainer_options_take_the_flags_names_too() -> None:
    cfg = LoopConfig(**LOOP, rm_options={"format": "trl", "max_steps": 2},
                     policy_options={"reward": ["a.b:c"], "lr": 1e-5})
    assert cfg.rm_options == {"data_format": "trl", "max_steps": 2}
    rm = cfg.rm_config(model="p", data=Path("d.jsonl"), out=Path("o"))
    assert rm.data_format == "trl"
    built = cfg.policy_config(policy="p", rewards=("rm",), out=Path("o"))
    assert built.rewards == ("a.b:c",)  # policy_options win over the loop's own
    dpo = LoopConfig(**LOOP, algorithm="dpo", policy_options={"ref_cached": False})
    assert dpo.policy_config(model="p", data=Path("d"), out=Path("o")).precompute_ref is False
    with pytest.raises(ValueError, match="rm_options: 'format' and 'data_format' are one"):
        LoopConfig(**LOOP, rm_options={"format": "trl", "data_format": "hh"})


def test_cli_config_file_takes_the_flags_name(tmp_path: Path) -> None:
    """The audit's reproduction: `reward:` in a grpo --config file was an unknown key."""
    config = _yaml(tmp_path, {"reward": ["a.b:c"], "top_p": 1.5})
    result = _invoke(["train", "grpo", "--model", "p", "--prompts", "x.jsonl", "--out", "o",
                      "--config", str(config)])
    assert "top_p must be in (0, 1], got 1.5" in result.output  # reward: was read
    _yaml(tmp_path, {"reward": "a.b:c"})  # a value's mistake names the key as written
    result = _invoke(["train", "grpo", "--model", "p", "--prompts", "x.jsonl", "--out", "o",
                      "--config", str(config)])
    assert "reward: expected a list of strings, got 'a.b:c'" in result.output


def test_the_loop_yaml_is_checked_the_same_way(tmp_path: Path) -> None:
    path = _text(tmp_path, "policy: p\nprompts: x.jsonl\nrounds: two\n")
    with pytest.raises(UserError, match="rounds: expected an integer, got 'two'"):
        load_config(LoopConfig, path)


def test_the_shipped_examples_still_load() -> None:
    cfg = load_config(LoopConfig, EXAMPLES / "loop.yaml")
    assert cfg.rm_options == {"max_steps": 40, "batch_size": 16, "lr": 0.001}
    assert len(load_pool(EXAMPLES / "pool.yaml")) == 9


# -- ranges: NaN, infinity, the clip and the sampling settings ---------------------------------


@pytest.mark.parametrize(("cls", "base", "keys", "words"), [
    (SFTConfig, SFT, {"lr": math.nan}, "lr must be a finite number, got nan"),
    (SFTConfig, SFT, {"max_grad_norm": math.inf}, "max_grad_norm must be a finite number"),
    (DPOConfig, SFT, {"beta": math.nan}, "beta must be a finite number"),
    (RewardConfig, SFT, {"label_smoothing": math.inf}, "label_smoothing must be a finite"),
    (GRPOConfig, RL, {"kl_coef": math.nan}, "kl_coef must be a finite number"),
    (PPOConfig, RL, {"lam": math.nan}, "lam must be a finite number"),
    (GRPOConfig, RL, {"clip_eps": -0.2}, "clip_eps must be > 0, got -0.2"),
    (GRPOConfig, RL, {"clip_eps_high": 0.0}, "clip_eps_high must be > 0"),
    (GRPOConfig, RL, {"entropy_coef": -0.01}, "entropy_coef must be >= 0"),
    (GRPOConfig, RL, {"is_cap": 0.0}, "is_cap must be > 0"),
    (GRPOConfig, RL, {"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    (GRPOConfig, RL, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    (PPOConfig, RL, {"top_k": -5}, "top_k must be >= 0"),
    (PPOConfig, RL, {"temperature": 0.0}, "temperature must be > 0"),
    (GRPOConfig, RL, {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    (PPOConfig, RL, {"value_clip": -1.0}, "value_clip must be > 0"),
])
def test_numbers_out_of_range_are_refused(cls: type, base: dict[str, Any], keys: dict[str, Any],
                                          words: str) -> None:
    with pytest.raises(ValueError, match=words):
        cls(**base, **keys)


def test_the_online_defaults_pass_their_range_checks() -> None:
    cfg = GRPOConfig(**RL, top_p=0.9, top_k=5, clip_eps_high=0.28)
    assert (cfg.top_p, cfg.top_k, cfg.clip_eps_high) == (0.9, 5, 0.28)
    assert PPOConfig(**RL).clip_eps == 0.2


@pytest.mark.parametrize(("keys", "words"), [
    ({"max_kl": math.nan}, "max_kl must be a finite number"),
    ({"wait_timeout_s": math.inf}, "wait_timeout_s must be a finite number"),
    ({"max_length_ratio": 0.0}, "max_length_ratio must be > 1"),
    ({"max_length_ratio": 0.8}, "max_length_ratio must be > 1"),  # once only the alarm said so
    ({"max_kl": 0.0}, "max_kl must be > 0"),
    ({"alarm_window": 0}, "alarm_window at least 1"),
])
def test_loop_numbers_out_of_range_are_refused(keys: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        LoopConfig(**LOOP, **keys)


# -- the loop's trainer options: checked when the loop starts, not at their stage --------------


@pytest.mark.parametrize(("keys", "words"), [
    ({"rm_options": {"bogus": 1}}, r"rm_options: unknown keys \['bogus'\]"),
    # transformers' names (upgrade audit s15 L2: an old config's save_steps) point to ours
    ({"rm_options": {"save_steps": 5, "learning_rate": 1e-5}},
     r"unknown keys \['learning_rate' \(did you mean 'lr'\?\), 'save_steps' \(did you mean "
     r"'save_every'\?\)\]"),
    ({"rm_options": {"lr": "fast"}}, "rm_options: lr: expected a number, got 'fast'"),
    ({"rm_options": {"lr": -1.0}}, "rm_options: lr must be > 0"),
    ({"rm_options": {"eval_fraction": 0.0}}, "rm_options: --eval-every needs held-out data"),
    ({"policy_options": {"top_p": 3}}, r"policy_options: top_p must be in \(0, 1\], got 3"),
    ({"policy_options": {"top_k": -5}}, "policy_options: top_k must be >= 0"),
    ({"policy_options": {"batch_size": 3}}, "policy_options: batch_size 3 .* multiple of "
                                             "num_generations 4"),
    ({"policy_options": {"num_generations": 4}, "algorithm": "dpo"},
     r"policy_options: unknown keys \['num_generations'\]"),
    ({"policy_options": {"exclude_flagged": True, "db": "sqlite:///x.db"},
      "algorithm": "dpo"}, r"policy_options \['db', 'exclude_flagged'\]: the loop's DPO pairs"),
    ({"policy_options": {"scale_rewards": "no"}}, "policy_options: scale_rewards: expected "
                                                  "true or false"),
    ({"policy_options": {"vf_coef": 0.0}, "algorithm": "ppo"}, "vf_coef and value_lr must be"),
    ({"generation": {"vllm_gpu_memory_utilization": "lots"}},
     "generation: vllm_gpu_memory_utilization: expected a number"),
    ({"generation": {"generator": "vllm", "vllm_mode": "server"}},
     "generation: --vllm-mode server needs --vllm-server"),
])
def test_loop_trainer_options_are_checked_when_the_loop_starts(keys: dict[str, Any],
                                                              words: str) -> None:
    with pytest.raises(ValueError, match=words):
        LoopConfig(**LOOP, **keys)


def test_loop_trainer_options_are_kept_as_numbers() -> None:
    cfg = LoopConfig(**LOOP, rm_options={"lr": "1e-3", "max_steps": 5.0},
                     policy_options={"lr": "1e-5", "top_p": 0.9},
                     generation={"vllm_gpu_memory_utilization": 1})
    assert cfg.rm_options == {"lr": 1e-3, "max_steps": 5}
    assert cfg.policy_options == {"lr": 1e-5, "top_p": 0.9}
    assert cfg.generation == {"vllm_gpu_memory_utilization": 1.0}
    built = cfg.policy_config(policy="p", rewards=("rm",), out=Path("o"))
    assert isinstance(built, GRPOConfig) and built.advantage == "grpo" and built.top_p == 0.9
    rm = cfg.rm_config(model="p", data=Path("d.jsonl"), out=Path("o"), eval_every=5)
    assert isinstance(rm, RewardConfig) and (rm.lr, rm.eval_every) == (1e-3, 5)


def test_loop_options_of_every_algorithm_are_built() -> None:
    assert LoopConfig(**LOOP, algorithm="rloo").policy_config(
        policy="p", rewards=("rm",), out=Path("o")).advantage == "rloo"
    assert isinstance(LoopConfig(**LOOP, algorithm="ppo", policy_options={"lam": 0.9})
                      .policy_config(policy="p", rewards=("rm",), out=Path("o")), PPOConfig)
    assert isinstance(LoopConfig(**LOOP, algorithm="dpo", policy_options={"beta": 0.2})
                      .policy_config(model="p", data=Path("d"), out=Path("o")), DPOConfig)


# -- simulated pools --------------------------------------------------------------------------


@pytest.mark.parametrize(("pool", "words"), [
    ({"annotators": [{"name": "a", "temperature": "hot"}]},
     "pool.yaml: annotators[0]: temperature: expected a number, got 'hot'"),
    ({"annotators": [{"name": "a", "flip": True}]}, "annotators[0]: flip: expected a number"),
    ({"annotators": [{"name": "a", "group": ["g"]}]}, "annotators[0]: group: expected a string"),
    ({"annotators": [{"name": "a", "weights": {"helpful": "much"}}]},
     "annotators[0]: weights.helpful: expected a number"),
    ({"groups": {"g": {"weights": {"helpful": "much"}}}, "annotators": [{"name": "a"}]},
     "pool.yaml: groups.g: weights.helpful: expected a number"),
])
def test_a_pool_value_of_the_wrong_type_names_the_entry_and_key(pool: dict[str, Any],
                                                                words: str) -> None:
    with pytest.raises(UserError) as info:
        parse_pool(pool, "pool.yaml")
    assert words in str(info.value)


def test_a_pool_takes_yaml_numbers_as_numbers() -> None:
    (sim,) = parse_pool(yaml.safe_load("annotators:\n  - {name: a, temperature: 5e-1, "
                                       "time_median_s: 3}\n"))
    assert (sim.temperature, sim.time_median_s) == (0.5, 3.0)


# -- the command line: exit 2, one line, no traceback ------------------------------------------


def _invoke(args: list[str]) -> Any:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result


def test_a_quoted_false_does_not_overwrite_a_finished_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"steps": 3}))
    config = _yaml(tmp_path, {"overwrite": "false"})
    result = _invoke(["train", "sft", "--model", "m", "--data", str(tmp_path / "sft.jsonl"),
                      "--out", str(out), "--config", str(config)])
    assert "overwrite: expected true or false, got 'false'" in result.output
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize(("args", "words"), [
    (["train", "sft", "--model", "m", "--data", "d.jsonl", "--out", "o", "--lr", "nan"],
     "lr: expected a number, got nan"),
    (["train", "grpo", "--policy", "p", "--prompts", "x.jsonl", "--reward", "a.b:c", "--out",
      "o", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["train", "ppo", "--policy", "p", "--prompts", "x.jsonl", "--reward", "a.b:c", "--out",
      "o", "--top-k", "-5"], "top_k must be >= 0"),
    (["train", "rloo", "--policy", "p", "--prompts", "x.jsonl", "--reward", "a.b:c", "--out",
      "o", "--clip-eps", "-0.2"], "clip_eps must be > 0, got -0.2"),
])
def test_cli_flags_out_of_range_exit_2(args: list[str], words: str) -> None:
    assert words in _invoke(args).output


def test_cli_loop_refuses_bad_trainer_options_before_round_1(tmp_path: Path) -> None:
    config = _yaml(tmp_path, {"policy": "p", "prompts": "x.jsonl",
                              "workdir": str(tmp_path / "run"), "rm_options": {"lr": "fast"}})
    result = _invoke(["loop", "--config", str(config)])
    assert "rm_options: lr: expected a number, got 'fast'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_sft_eval_every_without_held_out_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="--eval-every needs held-out rows"):
        SFTConfig(**SFT, eval_every=5)
    assert SFTConfig(**SFT, eval_every=5, eval_data=Path("held.jsonl")).eval_every == 5

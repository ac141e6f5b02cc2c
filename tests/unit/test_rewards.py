"""Reward sources: spec parsing, Python functions (and their failures), reward models (read at
the last real token, normalised), weighted sums, clipping and the missing-EOS penalty."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rewardloop.errors import TrainingError, UserError
from rewardloop.rewards import Rewards, RewardSpec, parse_reward_spec


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def echo_kwargs(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    echo_kwargs.seen = kwargs  # type: ignore[attr-defined]
    echo_kwargs.completions = completions  # type: ignore[attr-defined]
    return [1.0] * len(completions)


def raises(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    raise KeyError("no answer column")


def too_short(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [0.0] * (len(completions) - 1)


def not_a_number(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[Any]:
    return ["good"] * len(completions)


def a_dict(prompts: list[Any], completions: list[Any], **kwargs: Any) -> dict[int, float]:
    return {i: 5.0 for i in range(len(completions))}  # iterating it would give the keys


def a_matrix(prompts: list[Any], completions: list[Any], **kwargs: Any) -> Any:
    return torch.ones(len(completions), 1)


def an_array(prompts: list[Any], completions: list[Any], **kwargs: Any) -> Any:
    return torch.tensor([1.5] * len(completions))


def nan_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [1.0, math.nan][: len(completions)]




def score(rewards: Rewards, prompts: list[Any], completions: list[str],
          has_eos: list[bool] | None = None, **extra: Any):
    has_eos = has_eos if has_eos is not None else [True] * len(completions)
    return rewards(prompts, completions, has_eos=has_eos,
                   completion_ids=[[1, 2]] * len(completions), **extra)


@pytest.mark.parametrize(("text", "expected"), [
    ("pkg.mod:fn", RewardSpec("pkg.mod:fn", 1.0)),
    ("pkg.mod:fn@0.5", RewardSpec("pkg.mod:fn", 0.5)),
    ("runs/rm@-2", RewardSpec("runs/rm", -2.0)),
    ("runs/a@b/model", RewardSpec("runs/a@b/model", 1.0)),  # '@' inside a path is not a weight
])
def test_parse_reward_spec(text: str, expected: RewardSpec) -> None:
    assert parse_reward_spec(text) == expected


@pytest.mark.parametrize("text", ["", "@2", "pkg.mod:fn@nan"])
def test_parse_reward_spec_refuses(text: str) -> None:
    with pytest.raises(UserError):
        parse_reward_spec(text)


def test_a_function_spec_with_a_weight_that_is_no_number_says_so() -> None:
    with pytest.raises(UserError, match="the weight 'abc' after '@' is not a number"):
        parse_reward_spec("myrew:good@abc")
    assert parse_reward_spec("runs/rm@v2").spec == "runs/rm@v2"  # a path may hold '@'


def test_weighted_sum_clip_and_missing_eos_penalty() -> None:
    rewards = Rewards([RewardSpec("test_rewards:length_reward", 0.5),
                       RewardSpec("rewardloop.synthetic:gold_score", 0.0)],
                      reward_clip=3.0, missing_eos_penalty=1.0)
    out = score(rewards, ["p"] * 3, ["ab", "abcdefgh", "abcd"], has_eos=[True, True, False])
    # 0.5 * len -> [1, 4, 2]; clip to 3 -> [1, 3, 2]; the cut answer loses 1 after the clip.
    assert out.total.tolist() == [1.0, 3.0, 1.0]
    assert out.per_source["length_reward"].tolist() == [2.0, 8.0, 4.0]
    metrics = out.metrics()
    assert metrics["reward/length_reward/mean"] == pytest.approx(14 / 3)
    assert metrics["reward/mean"] == pytest.approx(5 / 3)
    assert "reward/gold_score/std" in metrics


def test_a_1d_array_or_tensor_is_a_list_of_floats() -> None:
    assert score(Rewards([RewardSpec("test_rewards:an_array")]), ["p", "q"],
                 ["a", "b"]).total.tolist() == [1.5, 1.5]


def test_same_function_twice_gets_distinct_names() -> None:
    rewards = Rewards([RewardSpec("test_rewards:length_reward"),
                       RewardSpec("test_rewards:length_reward", 2.0)])
    assert rewards.names == ["length_reward", "length_reward_2"]
    assert score(rewards, ["p"], ["abc"]).total.tolist() == [9.0]


def test_function_gets_trl_kwargs_and_chat_completions() -> None:
    rewards = Rewards([RewardSpec("test_rewards:echo_kwargs")])
    chat = [{"role": "user", "content": "hi"}]
    score(rewards, [chat, "plain"], ["x", "y"], has_eos=[True, False], answer=["a", "b"])
    seen = echo_kwargs.seen  # type: ignore[attr-defined]
    assert seen["has_eos"] == [True, False]
    assert seen["completion_ids"] == [[1, 2], [1, 2]]
    assert seen["answer"] == ["a", "b"]
    # As in TRL: a chat prompt gets a chat completion, a text prompt a string.
    assert echo_kwargs.completions == [  # type: ignore[attr-defined]
        [{"role": "assistant", "content": "x"}], "y"]


@pytest.mark.parametrize(("fn", "error", "words"), [
    ("raises", UserError, ["test_rewards:raises", "KeyError", "no answer column"]),
    ("too_short", UserError, ["test_rewards:too_short", "returned 1 values for 2"]),
    ("not_a_number", UserError, ["test_rewards:not_a_number", "'good'"]),
    ("nan_reward", TrainingError, ["nan_reward", "completion 1", "finite"]),
    ("a_dict", UserError, ["test_rewards:a_dict", "must return a list of floats", "got dict"]),
    ("a_matrix", UserError, ["test_rewards:a_matrix", "of 2 dimensions"]),
])
def test_bad_reward_function_names_itself(fn: str, error: type, words: list[str]) -> None:
    rewards = Rewards([RewardSpec(f"test_rewards:{fn}")])
    with pytest.raises(error) as info:
        score(rewards, ["p", "q"], ["a", "b"])
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(("spec", "words"), [
    ("no_such_module_xyz:fn", ["cannot import"]),
    ("test_rewards:missing", ["has no function 'missing'"]),
    ("not/a/dir", ["neither"]),
])
def test_bad_reward_spec(spec: str, words: list[str]) -> None:
    with pytest.raises(UserError) as info:
        Rewards([RewardSpec(spec)])
    for word in words:
        assert word in str(info.value)


def test_a_function_in_the_working_directory_is_found(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--reward, --gold, --judge and simulate --gold import alike (util.imports): a local
    module works without PYTHONPATH."""
    from rewardloop.feedback.simulate import load_gold

    (tmp_path / "local_reward_s11.py").write_text(
        "def by_length(prompts, completions, **kw):\n"
        "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "local_reward_s11", raising=False)
    rewards = Rewards([RewardSpec("local_reward_s11:by_length")])
    out = score(rewards, ["p", "p"], ["a", "abc"], has_eos=[True, True])
    assert out.total.tolist() == [1.0, 3.0]
    assert load_gold("local_reward_s11:by_length")(prompts=["p"], completions=["ab"]) == [2.0]
    assert str(tmp_path) not in sys.path  # searched for the import, not left behind


def test_no_reward_is_refused() -> None:
    with pytest.raises(UserError, match="at least one"):
        Rewards([])


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``train rm``-like run dir: model/ with a random scalar head and reward_stats.json."""
    from rewardloop.models import load_reward_model, load_tokenizer
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("rm")
    base = build_tiny(root / "base", generate_corpus(300), vocab_size=320, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=128)
    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = load_reward_model(base, device="cpu", pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "run" / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "run" / "model")
    (root / "run" / "model" / "reward_stats.json").write_text(
        json.dumps({"mean": 1.5, "std": 2.0}))
    return root / "run"


def _raw_alone(model_dir: Path, prompt: str, completion: str, max_length: int) -> float:
    """The head applied to the hidden state of the LAST token of one unpadded sequence."""
    from rewardloop.models import load_reward_model, load_tokenizer
    from rewardloop.tokenize import encode

    tokenizer = load_tokenizer(model_dir)
    model = load_reward_model(model_dir, device="cpu", trainable=False).eval()
    ids = torch.tensor([encode(tokenizer, prompt, completion, max_length=max_length).input_ids])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # (1, T, H)
        return float(model.score(hidden[0, -1]))


def test_reward_model_reads_last_real_token_and_normalises(rm_run: Path) -> None:
    """Batched (right-padded, different lengths, one answer cut at max_length) scores equal the
    head on the last token of each sequence alone, normalised by reward_stats.json."""
    prompts = ["Hi, my order is late.", "Refund please", "Where is my parcel?"]
    completions = ["Sorry!", "I have started a refund for your order and it will arrive soon "
                   "and you will be happy about it", "It ships today."]
    max_length = 24  # the second answer does not fit: scored at its last kept token, no EOS
    rewards = Rewards([RewardSpec(str(rm_run))], batch_size=3, max_length=max_length)
    assert rewards.names == ["run"]
    got = score(rewards, prompts, completions).total
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        expected = (_raw_alone(rm_run / "model", p, c, max_length) - 1.5) / 2.0
        assert got[i].item() == pytest.approx(expected, abs=1e-5)


def test_reward_model_dir_without_stats_is_refused(rm_run: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(rm_run / "model", bare)
    (bare / "reward_stats.json").unlink()
    with pytest.raises(UserError, match="reward_stats.json") as err:
        Rewards([RewardSpec(str(bare))])
    # The way the message names (interop audit s15 M5: it named an option RL lacks) works.
    assert "RewardScorer(DIR)" in str(err.value)
    from rewardloop.score import RewardScorer

    raw = RewardScorer(str(bare))(["Where is my parcel?"], ["It ships today."])
    assert len(raw) == 1 and isinstance(raw[0], float)


def test_uncertainty_penalty_is_the_ensemble_mean_minus_lambda_std(
        rm_run: Path, tmp_path: Path) -> None:
    """A 3-head ensemble: the reward is mean - 0.5 x std over the normalised heads (Coste et
    al. 2023), the std is logged per source; a single-head model refuses the penalty."""
    from rewardloop.score import RewardScorer
    from rewardloop.synthetic import preference_rows
    from rewardloop.train.reward import RewardConfig, train_rm

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(8, seed=1)))
    train_rm(RewardConfig(model=str(rm_run / "model"), data=data, out=tmp_path / "ens",
                          ensemble=3, max_steps=2, batch_size=4, max_length=64, device="cpu"))
    prompts, completions = ["Hi, my order is late."] * 2, ["Sorry!", "It ships today."]
    heads = RewardScorer(tmp_path / "ens" / "model", device="cpu", normalize=True).score_heads(
        prompts, completions)  # (2, 3), normalised
    assert heads.shape == (2, 3)
    out = score(Rewards([RewardSpec(str(tmp_path / "ens"))], uncertainty_penalty=0.5),
                prompts, completions)
    std = heads.std(dim=1, unbiased=False)
    assert torch.allclose(out.total, heads.mean(dim=1) - 0.5 * std, atol=1e-5)
    assert torch.allclose(out.per_source["ens/uncertainty"], std, atol=1e-5)
    plain = score(Rewards([RewardSpec(str(tmp_path / "ens"))]), prompts, completions)
    assert torch.allclose(plain.total, heads.mean(dim=1), atol=1e-5)
    with pytest.raises(UserError, match="needs a reward-model ensemble"):
        Rewards([RewardSpec(str(rm_run))], uncertainty_penalty=0.5)


def test_a_language_model_given_as_a_reward_model_is_refused_by_name(tmp_path: Path) -> None:
    """A policy where a reward model belongs (its fresh head would score at random): the
    message names the flag that gave it and says what to do."""
    from rewardloop.tiny import build_tiny, generate_corpus

    base = build_tiny(tmp_path / "policy", generate_corpus(100), vocab_size=300, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=32)
    with pytest.raises(UserError, match=r"--judge .*is not a reward model .*train rm"):
        Rewards([RewardSpec(str(base))], device="cpu", flag="--judge")
    with pytest.raises(UserError, match=r"--gold nosuch_mod_x:fn: cannot import"):
        Rewards([RewardSpec("nosuch_mod_x:fn")], flag="--gold")

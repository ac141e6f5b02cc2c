"""A reward model with several heads (--ensemble K, --group-heads) as a starting point: for
train rm (the loop's later rounds warm-start from the previous round's) and as PPO's value
model. Heads are kept when they are the ones asked for, a scalar head starts from their mean,
and otherwise only the trunk is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewardloop.errors import UserError
from rewardloop.models import ENSEMBLE_KEY, load_reward_model, load_tokenizer, load_value_model
from rewardloop.synthetic import corpus_texts, preference_rows
from rewardloop.tiny import build_tiny
from rewardloop.train.reward import RewardConfig, load_model, load_tokenizer_for, train_rm
from rewardloop.train.runtime import Runtime, RuntimeOptions


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a 2-head ensemble reward model's run, its data); 2 heads is the case transformers
    leaves out of config.json's labels."""
    root = tmp_path_factory.mktemp("heads")
    tiny = build_tiny(root / "tiny", corpus_texts(100), vocab_size=300, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=96)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(16, seed=1)))
    train_rm(RewardConfig(model=str(tiny), data=data, out=root / "rm", ensemble=2, max_steps=2,
                          batch_size=4, max_length=64, device="cpu", lr=1e-2))
    return root / "rm" / "model", data


def _start(model: Path, data: Path, out: Path, **kw: object) -> torch.nn.Module:
    cfg = RewardConfig(model=str(model), data=data, out=out, max_length=64, device="cpu", **kw)
    return load_model(cfg, load_tokenizer_for(cfg), Runtime(RuntimeOptions()))


def test_heads_are_kept_when_the_same_ensemble_is_asked_for(ensemble, tmp_path) -> None:
    model_dir, data = ensemble
    saved = load_file(str(model_dir / "model.safetensors"))
    model = _start(model_dir, data, tmp_path / "o", ensemble=2)
    assert torch.equal(model.score.weight, saved["score.weight"])
    assert getattr(model.config, ENSEMBLE_KEY) == 2
    debias = _start(model_dir, data, tmp_path / "o", ensemble=2, length_debias=True)
    assert debias.score.weight.shape[0] == 3  # the length head is new, the two kept
    assert torch.equal(debias.score.weight[:2], saved["score.weight"])


def test_a_scalar_head_starts_from_the_heads_mean(ensemble, tmp_path) -> None:
    model_dir, data = ensemble
    model = _start(model_dir, data, tmp_path / "o")
    weights = load_file(str(model_dir / "model.safetensors"))["score.weight"]
    assert torch.allclose(model.score.weight, weights.mean(0, keepdim=True))
    assert model.config.num_labels == 1 and not hasattr(model.config, ENSEMBLE_KEY)
    # The scalar model scores every answer with the ensemble's mean reward.
    original = load_reward_model(model_dir, heads=2, trainable=False, device="cpu")
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    batch = tokenizer(["Say hi: hi there", "Say hi: no"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = original(**batch).logits.mean(-1)
        got = model.eval()(**batch).logits[:, 0]
    assert torch.allclose(got, want, atol=1e-6)


def test_other_heads_keep_only_the_trunk(ensemble, tmp_path) -> None:
    model_dir, data = ensemble
    saved = load_file(str(model_dir / "model.safetensors"))
    model = _start(model_dir, data, tmp_path / "o", ensemble=3)
    assert model.score.weight.shape[0] == 3 and getattr(model.config, ENSEMBLE_KEY) == 3
    assert not torch.equal(model.score.weight[:2], saved["score.weight"])
    trunk = {k: v for k, v in saved.items() if not k.startswith("score")}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trunk.items())


def test_train_rm_and_a_value_model_start_from_an_ensemble(ensemble, tmp_path) -> None:
    model_dir, data = ensemble
    summary = train_rm(RewardConfig(model=str(model_dir), data=data, out=tmp_path / "again",
                                    ensemble=2, max_steps=1, batch_size=4, max_length=64,
                                    device="cpu"))
    assert summary["ensemble"] == 2
    value = load_value_model(model_dir, device="cpu", pad_token_id=0)
    weights = load_file(str(model_dir / "model.safetensors"))["score.weight"]
    assert value.score.weight.shape == (1, weights.shape[1])
    assert torch.allclose(value.score.weight, weights.mean(0, keepdim=True))


def test_another_classifier_with_several_labels_is_no_reward_model(ensemble, tmp_path) -> None:
    """Only a reward model's heads (its config names an ensemble or groups) are taken as
    heads; a sentiment classifier's labels are not averaged into a reward."""
    from transformers import AutoModelForSequenceClassification

    model_dir, data = ensemble
    other = AutoModelForSequenceClassification.from_pretrained(model_dir)
    del other.config.reward_ensemble
    other.config.num_labels = 3
    other.score = torch.nn.Linear(other.score.in_features, 3, bias=False)
    other.save_pretrained(tmp_path / "sentiment")
    load_tokenizer(model_dir).save_pretrained(tmp_path / "sentiment")
    with pytest.raises(UserError, match="is a classifier with 3 labels; a reward model has "
                                        "exactly one"):
        _start(tmp_path / "sentiment", data, tmp_path / "o")
    with pytest.raises(UserError, match="is a classifier with 3 labels"):
        load_value_model(tmp_path / "sentiment", device="cpu", pad_token_id=0)

"""Safe model loading, tokenizer checks, reward heads, LoRA save/merge, dropout, dtype/device."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rewardloop.errors import UserError
from rewardloop.models import (
    LoraSettings,
    apply_lora,
    disable_adapter,
    disable_dropout,
    load_policy,
    load_reward_model,
    load_tokenizer,
    match_tokenizer,
    resolve_device,
    resolve_dtype,
    save_model,
)
from rewardloop.tiny import build_tiny, generate_corpus

LORA = LoraSettings(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "m", generate_corpus(200),
                      vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, max_position=32)


@pytest.fixture
def copy_dir(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def _batch(tokenizer, texts=("my order is late", "hi")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


# ----------------------------------------------------------------------------- refusals


def test_missing_dir_and_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_policy(tmp_path / "empty")
    with pytest.raises(UserError, match="no config.json"):
        load_tokenizer(tmp_path / "empty")


def test_a_model_of_the_other_kind_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    """A reward model where a policy is expected, a language model where a trained reward
    model is expected (it would score with a random head), and a run directory where its model
    is expected: each refused, saying what to give."""
    tokenizer = load_tokenizer(tiny_dir)
    rm = tmp_path / "run" / "model"
    load_reward_model(tiny_dir, device="cpu", pad_token_id=tokenizer.pad_token_id
                      ).save_pretrained(rm, safe_serialization=True)
    with pytest.raises(UserError, match="is a reward model .*not a language model"):
        load_policy(rm)
    with pytest.raises(UserError, match="is not a reward model .*train rm"):
        load_reward_model(tiny_dir, trainable=False, pad_token_id=tokenizer.pad_token_id)
    load_reward_model(rm, trainable=False)  # a trained head: fine
    with pytest.raises(UserError, match=f"is a run directory; its model is {rm}"):
        load_policy(tmp_path / "run")


def test_corrupt_safetensors_is_refused(copy_dir: Path) -> None:
    weights = copy_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_policy(copy_dir)


def test_pickle_only_dir_is_refused_without_unpickling(copy_dir: Path) -> None:
    (copy_dir / "model.safetensors").unlink()
    (copy_dir / "pytorch_model.bin").write_bytes(b"not even read: a pickle could run code")
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_policy(copy_dir)
    with pytest.raises(UserError, match="only pickle"):
        load_reward_model(copy_dir)


def test_hub_id_offline_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_policy("no-such-org/no-such-model")


def test_a_name_without_a_slash_says_it_is_tried_on_the_hub_first(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from rewardloop.model_files import check_model_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with caplog.at_level("WARNING"):
        assert check_model_dir("modle") == "modle"  # no network call here: only the check
    assert "'modle' is not a local directory: trying it as a Hugging Face Hub id" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_model_dir("Qwen/Qwen2-0.5B")  # an org/name id: the usual case, no warning
    assert caplog.text == ""


def test_pad_equal_to_eos_is_refused_and_can_be_fixed(copy_dir: Path) -> None:
    config = json.loads((copy_dir / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    (copy_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="#1623"):
        load_tokenizer(copy_dir)
    tokenizer = load_tokenizer(copy_dir, add_pad_token=True, padding_side="left")
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    model = load_policy(copy_dir)
    match_tokenizer(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model(**_batch(tokenizer)).logits.shape[-1] == len(tokenizer)


def test_missing_pad_is_refused(copy_dir: Path) -> None:
    config = json.loads((copy_dir / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (copy_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no pad token"):
        load_tokenizer(copy_dir)


def test_dtype_and_device_resolution(tiny_dir: Path) -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16") == torch.float16
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("fp8")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    model = load_policy(tiny_dir, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- reward models


def test_reward_model_from_causal_lm_pools_last_real_token(tiny_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    rm = load_reward_model(tiny_dir).eval()
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        padded = rm(**_batch(tokenizer)).logits  # (2, 1)
        alone = rm(**_batch(tokenizer, ["hi"])).logits  # (1, 1)
    assert padded.shape == (2, 1)
    torch.testing.assert_close(padded[1], alone[0])  # padding does not change the reward
    save_model(rm, tokenizer, tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(again(**_batch(tokenizer)).logits, padded)


def test_multi_label_classifier_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    clf = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=3)
    clf.save_pretrained(tmp_path / "clf")
    with pytest.raises(UserError, match="3 labels"):
        load_reward_model(tmp_path / "clf")


def test_reward_model_lora_trains_adapters_and_head(tiny_dir: Path) -> None:
    rm = load_reward_model(tiny_dir, lora=LORA)
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


# ----------------------------------------------------------------------------- LoRA


def _perturbed_lora_policy(tiny_dir: Path):
    model = load_policy(tiny_dir, lora=LORA).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_lora_only_adapters_train_and_disable_adapter_gives_base(tiny_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    base = load_policy(tiny_dir).eval()
    model = _perturbed_lora_policy(tiny_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch(tokenizer)
    with torch.no_grad():
        with_adapter = model(**batch).logits
        with disable_adapter(model):
            reference = model(**batch).logits
        assert torch.equal(reference, base(**batch).logits)
        assert not torch.allclose(with_adapter, reference)
        assert torch.equal(model(**batch).logits, with_adapter)  # re-enabled after the block
    with pytest.raises(TypeError, match="LoRA"):
        with disable_adapter(base):
            pass


def test_lora_adapter_and_merged_saves_load_without_rewardloop(tiny_dir: Path,
                                                              tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_dir)
    model = _perturbed_lora_policy(tiny_dir)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    save_model(model, tokenizer, tmp_path / "adapter")
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "config.json" not in names
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                      tmp_path / "adapter").eval()
    ours = load_policy(tmp_path / "adapter", trainable=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected)
        torch.testing.assert_close(ours(**batch).logits, expected)
    with pytest.raises(UserError, match="already holds LoRA"):
        load_policy(tmp_path / "adapter", lora=LORA)

    merged = save_model(model, tokenizer, tmp_path / "merged", merge_lora=True)
    assert "adapter_config.json" not in {p.name for p in (tmp_path / "merged").iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_apply_lora_with_unknown_modules_is_a_user_error(tiny_dir: Path) -> None:
    with pytest.raises(UserError, match="cannot apply LoRA"):
        apply_lora(load_policy(tiny_dir), LoraSettings(target_modules=("no_such_proj",)))
    with pytest.raises(ValueError):
        LoraSettings(r=0)


def test_disable_dropout_makes_train_mode_deterministic(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attention_dropout=0.5).train()
    batch = _batch(tokenizer)
    assert not torch.equal(model(**batch).logits, model(**batch).logits)
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0
    assert torch.equal(model(**batch).logits, model(**batch).logits)


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def test_an_adapter_loads_from_any_working_directory(tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(tiny_dir, tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    tokenizer = load_tokenizer("base")
    model = _perturb(load_policy("base", lora=LORA))  # --model given as a relative path
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    save_model(model, tokenizer, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with torch.no_grad():
        torch.testing.assert_close(
            load_policy(tmp_path / "adapter", trainable=False).eval()(**batch).logits, expected)
    # An adapter saved with a relative base (before bases were recorded absolute) finds it
    # beside itself; one whose base is nowhere says which adapter and what to do.
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "../work/base"}))
    with torch.no_grad():
        torch.testing.assert_close(
            load_policy(tmp_path / "adapter", trainable=False).eval()(**batch).logits, expected)
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "./gone"}))
    with pytest.raises(UserError, match="names its base model './gone'.*adapter_config.json"):
        load_policy(tmp_path / "adapter")


def test_an_adapter_trained_with_an_added_pad_token_loads_back(copy_dir: Path,
                                                              tmp_path: Path) -> None:
    config = json.loads((copy_dir / "tokenizer_config.json").read_text())
    (copy_dir / "tokenizer_config.json").write_text(
        json.dumps({**config, "pad_token": config["eos_token"]}))
    tokenizer = load_tokenizer(copy_dir, add_pad_token=True)  # the embeddings grow by one row
    batch = _batch(tokenizer)
    policy = load_policy(copy_dir, lora=LORA)  # as train sft/dpo/grpo build it
    match_tokenizer(policy, tokenizer)
    reward = load_reward_model(copy_dir, pad_token_id=tokenizer.pad_token_id)  # as train rm
    match_tokenizer(reward, tokenizer)
    reward = apply_lora(reward, LORA)
    for name, model, load in (("policy", policy, load_policy), ("rm", reward, load_reward_model)):
        model = _perturb(model)
        with torch.no_grad():
            expected = model(**batch).logits
        save_model(model, tokenizer, tmp_path / name)
        reloaded = load(tmp_path / name, trainable=False).eval()
        assert reloaded.get_input_embeddings().num_embeddings == len(tokenizer)
        assert reloaded.config.pad_token_id == tokenizer.pad_token_id
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, expected, msg=name)


def test_an_adapter_with_pickled_weights_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    save_model(_perturb(load_policy(tiny_dir, lora=LORA)), tokenizer, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    shutil.copy(tiny_dir / "model.safetensors", tmp_path / "a" / "decoy.safetensors")
    with pytest.raises(UserError, match="without adapter_model.safetensors"):
        load_policy(tmp_path / "a")

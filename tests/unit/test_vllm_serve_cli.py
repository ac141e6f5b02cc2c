"""``rewardloop vllm-serve``: every flag is checked before vLLM is imported or a model loaded,
and the port is bound before the engine loads (a busy port is said at once). Runs without
vLLM: reaching the "needs vLLM" message proves the checks before it passed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.synthetic import corpus_texts
from rewardloop.tiny import build_tiny

try:
    import vllm  # noqa: F401

    HAS_VLLM = True
except ImportError:
    HAS_VLLM = False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "m", corpus_texts(50), vocab_size=300,
                      hidden_size=16, num_layers=1, num_heads=2, max_position=64)


def _serve(tiny: Path, *flags: str) -> object:
    return CliRunner().invoke(app, ["vllm-serve", "--model", str(tiny), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must be 0 to 65535"),
    (["--port", "-5"], "--port must be 0 to 65535"),
    (["--dtype", "foo"], "--dtype must be one of auto, float32, bfloat16, float16"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--max-model-len", "1"], "--max-model-len must be at least 2"),
    (["--logprobs-mode", "bad"], "--logprobs-mode must be raw or processed"),
])
def test_bad_flags_are_one_line_before_vllm(tiny: Path, flags: list[str], message: str) -> None:
    result = _serve(tiny, *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert "needs vLLM" not in result.output


@pytest.mark.skipif(HAS_VLLM, reason="the order is shown by the missing-vLLM message")
def test_a_busy_port_is_refused_before_the_engine_loads(tiny: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve(tiny, "--port", str(port))
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "needs vLLM" not in result.output
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = _serve(tiny, "--port", str(port))  # free: on to the engine, which is missing
    assert result.exit_code == 2 and "pip install 'rewardloop[vllm]'" in result.output
    with socket.socket() as again:  # the socket it bound was closed on the way out
        again.bind(("127.0.0.1", port))

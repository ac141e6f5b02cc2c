"""The vllm-serve client against a local HTTP server that answers slowly, fails, speaks another
protocol or is not there: every call times out and fails with one line naming the server and
what to check. A server speaking the protocol gets prompts, settings and weights as sent."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from rewardloop.engines.base import SamplingSettings, request_seed
from rewardloop.engines.client import ServerClient, ServerError, ServerGenerator
from rewardloop.errors import UserError

Behaviour = Callable[[BaseHTTPRequestHandler, bytes], tuple[int, bytes]]


def _json(status: int, body: object) -> tuple[int, bytes]:
    return status, json.dumps(body).encode()


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], str]]:
    """Start a local HTTP server whose every answer comes from ``behaviour``; yields its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(behaviour: Behaviour) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _reply(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, data = behaviour(self, body)
                try:
                    self.send_response(status)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (timeout tests)

            do_GET = do_POST = _reply

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_slow_server_times_out_with_a_message_naming_it(serve) -> None:
    def slow(handler, body):
        time.sleep(3)
        return _json(200, {})

    url = serve(slow)
    client = ServerClient(url, timeout_s=0.5)
    started = time.perf_counter()
    with pytest.raises(ServerError) as err:
        client.generate([[1, 2]], 2, SamplingSettings())
    assert time.perf_counter() - started < 2.5
    message = str(err.value)
    assert url in message and "POST /generate" in message and "0.5 s" in message
    assert "server's log" in message and "\n" not in message


def test_nothing_listening_is_a_clear_error(serve, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with caplog.at_level("WARNING"), pytest.raises(
            ServerError, match="cannot reach the vLLM server at .*rewardloop vllm-serve` runs "
                               "there"):
        ServerClient(url, timeout_s=2, retry_wait_s=0.01).health()
    assert caplog.text.count("trying again") == 2  # 3 tries, the last one raises


def test_failures_that_pass_are_tried_again(serve) -> None:
    """A proxy's 503 while the server restarts, or a dropped connection: tried again, and the
    call succeeds; the server's own refusal (HTTP 400/500) is not sent twice."""
    calls: list[str] = []

    def flaky(handler, body):
        calls.append(handler.path)
        if len(calls) == 1:
            return _json(503, {"error": "no upstream"})
        if len(calls) == 2:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)  # dropped without an answer
            return 200, b""
        return _json(200, {"model": "m", "logprobs_mode": "raw_logprobs"})

    client = ServerClient(serve(flaky), retry_wait_s=0.01)
    assert client.health()["model"] == "m" and calls == ["/health"] * 3
    refused: list[str] = []
    url = serve(lambda h, b: (refused.append(h.path), _json(400, {"error": "bad"}))[1])
    with pytest.raises(ServerError, match="HTTP 400"):
        ServerClient(url, retry_wait_s=0.01).generate([[1]], 1, SamplingSettings())
    assert refused == ["/generate"]
    with pytest.raises(ServerError, match="got HTTP 503"):
        ServerClient(serve(lambda h, b: _json(503, {})), attempts=2, retry_wait_s=0.01).health()


def test_a_connection_that_is_never_accepted_times_out_with_the_connect_limit() -> None:
    """A listener whose queue is full drops new connections (as a firewall would): the client
    gives up after its connect limit and says so, not the 600 s limit of a request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]
        for sock in queued:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        time.sleep(0.2)
        started = time.perf_counter()
        with pytest.raises(ServerError) as err:
            ServerClient(f"http://127.0.0.1:{port}", connect_timeout_s=0.5).health()
        for sock in queued:
            sock.close()
    assert time.perf_counter() - started < 3
    message = str(err.value)
    assert "could not connect" in message and "within 0.5 s" in message
    assert "600" not in message


def test_a_failing_server_passes_its_error_on(serve) -> None:
    url = serve(lambda h, b: _json(500, {"error": "RuntimeError: CUDA out of memory"}))
    with pytest.raises(ServerError, match=r"refused POST /generate \(HTTP 500\): RuntimeError: "
                                          r"CUDA out of memory; check the server's log"):
        ServerClient(url).generate([[1]], 1, SamplingSettings())


def test_a_server_that_is_not_vllm_serve(serve) -> None:
    url = serve(lambda h, b: (200, b"<html>hello</html>"))
    with pytest.raises(ServerError, match="no JSON; is it a `rewardloop vllm-serve`"):
        ServerClient(url).health()
    url = serve(lambda h, b: _json(200, {"completion_ids": [[1]]}))
    with pytest.raises(ServerError, match="without completion_ids/logps"):
        ServerClient(url).generate([[1]], 1, SamplingSettings())


class _Tokenizer:
    """What the client needs of a tokenizer: pad/EOS ids and decoding."""

    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool) -> list[str]:
        return [" ".join(str(int(t)) for t in row if int(t) > 1) for row in ids]


def test_generation_and_weight_push_through_the_protocol(serve) -> None:
    from safetensors.torch import load

    seen: dict[str, object] = {}

    def engine(handler, body):
        if handler.path == "/health":
            return _json(200, {"model": "m", "vllm": "0.32.0", "logprobs_mode": "raw_logprobs"})
        if handler.path == "/weights":
            seen["weights"] = load(body)
            return _json(200, {"loaded": len(seen["weights"])})
        request = json.loads(body)
        seen["generate"] = request
        if len(request["prompts"]) == 1:
            return _json(200, {"completion_ids": [[5, 1], [6, 1]], "logps": [[-1, -1]] * 2})
        # Prompt 0: "5 1" (EOS) and "6 7" (cut); prompt 1: "1" and "8 9 1".
        return _json(200, {"completion_ids": [[5, 1], [6, 7], [1], [8, 9, 1]],
                           "logps": [[-0.5, -0.1], [-1.0, -2.0], [-0.3], [-1, -2, -3]]})

    generator = ServerGenerator(serve(engine), _Tokenizer())
    settings = SamplingSettings(max_new_tokens=3, temperature=1.0, top_k=5)
    torch.manual_seed(11)
    rollout = generator.generate([[3, 4], [2]], 2, settings)
    torch.manual_seed(11)  # the seed sent comes from the trainer's (seeded) generator
    assert seen["generate"] == {"prompts": [[3, 4], [2]], "n": 2, "settings": {
        "max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 5},
        "seed": request_seed(), "never": [0]}  # the trainer's pad is never sampled
    assert rollout.prompt_ids.tolist() == [[3, 4], [3, 4], [0, 2], [0, 2]]
    assert rollout.completion_ids.tolist() == [[5, 1, 0], [6, 7, 0], [1, 0, 0], [8, 9, 1]]
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert rollout.has_eos.tolist() == [True, False, True, True]
    assert torch.equal(rollout.sampler_logps, torch.tensor(
        [[-0.5, -0.1, 0], [-1, -2, 0], [-0.3, 0, 0], [-1, -2, -3]]))
    assert rollout.texts == ["5", "6 7", "", "8 9"]
    assert "weights" not in seen  # nothing changed: nothing pushed

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))
    generator.policy_updated(model)
    generator.policy_updated(model)
    generator.generate([[3]], 2, settings)
    sent = seen.pop("weights")
    assert set(sent) == {n for n, _ in model.named_parameters()}
    assert torch.equal(sent["model.norm.weight"], model.model.norm.weight)
    generator.generate([[3]], 2, settings)
    assert "weights" not in seen  # pushed once per change


def test_a_server_says_its_context_and_dtype(serve) -> None:
    """A server that says its context gets the trainer's lengths checked at start (exit 2, not
    answers cut mid-run); one that says its dtype gets the weights in it (half the bytes of the
    fp32 master weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewardloop.engines.factory import EngineOptions, make_generator

    sent: dict[str, torch.Tensor] = {}

    def engine(handler, body):
        if handler.path == "/health":
            return _json(200, {"model": "m", "logprobs_mode": "raw_logprobs",
                               "max_model_len": 64, "dtype": "bfloat16"})
        if handler.path == "/weights":
            from safetensors.torch import load

            sent.update(load(body))
            return _json(200, {"loaded": len(sent)})
        return _json(200, {"completion_ids": [[1]], "logps": [[-1.0]]})

    url = serve(engine)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))
    options = EngineOptions(generator="vllm", vllm_mode="server", vllm_server=url)
    with pytest.raises(UserError, match=r"\(60 tokens\) \+ --max-new-tokens \(8\) = 68 tokens "
                                        r"exceed the vLLM engine's context \(max_model_len 64\)"):
        make_generator(options, model, _Tokenizer(), "m", max_lengths=(60, 8))
    generator = make_generator(options, model, _Tokenizer(), "m", max_lengths=(56, 8))
    generator.generate([[3]], 1, SamplingSettings(max_new_tokens=8))
    assert sent and {t.dtype for t in sent.values()} == {torch.bfloat16}


def test_a_server_with_the_wrong_logprobs_mode_is_refused_at_start(serve) -> None:
    url = serve(lambda h, b: _json(200, {"logprobs_mode": "raw_logprobs"}))
    settings = SamplingSettings(temperature=0.7)
    with pytest.raises(UserError, match=r"--logprobs-mode processed`"):
        ServerGenerator(url, _Tokenizer(), logprob_settings=settings)
    ServerGenerator(url, SimpleNamespace(pad_token_id=0, eos_token_id=1))  # no log-probs needed
    # eval and generate need no log-probs: a processed server serves them at any settings.
    processed = serve(lambda h, b: _json(200, {"logprobs_mode": "processed_logprobs"}))
    ServerGenerator(processed, _Tokenizer())
    with pytest.raises(UserError, match=r"--logprobs-mode raw`"):
        ServerGenerator(processed, _Tokenizer(), logprob_settings=SamplingSettings())


def test_the_suggested_logprobs_mode_is_one_vllm_serve_accepts() -> None:
    from rewardloop.cli.vllm_serve import LOGPROBS_MODES
    from rewardloop.engines.options import logprobs_mode

    for settings in (SamplingSettings(), SamplingSettings(temperature=0.7)):
        assert logprobs_mode(settings).removesuffix("_logprobs") in LOGPROBS_MODES


def test_the_client_ends_answers_at_every_stop_id(serve) -> None:
    """Stop ids from the trainer's model (EOS 1 and end-of-turn 7): an answer ending at 7 is
    ended (has_eos), as the built-in loop would count it."""
    def engine(handler, body):
        if handler.path == "/health":
            return _json(200, {"model": "m", "vllm": "0.32.0", "logprobs_mode": "raw_logprobs"})
        return _json(200, {"completion_ids": [[6, 7], [5, 1], [8, 9]],
                           "logps": [[-1, -1], [-1, -1], [-1, -1]]})

    generator = ServerGenerator(serve(engine), _Tokenizer(), stop_ids=[1, 7])
    rollout = generator.generate([[3]], 3, SamplingSettings(max_new_tokens=2))
    assert rollout.has_eos.tolist() == [True, True, False]


def test_a_pad_the_server_samples_anyway_is_no_answer_token(serve) -> None:
    """A pad added by --add-pad-token may be an ordinary token of the served model (which
    vllm-serve loads without a pad): the client asks the server not to sample it, and one
    that comes back anyway is masked, as the built-in loop masks it (review s14 M1)."""
    def engine(handler, body):
        if handler.path == "/health":
            return _json(200, {"model": "m", "vllm": "0.32.0", "logprobs_mode": "raw_logprobs"})
        return _json(200, {"completion_ids": [[5, 0, 6, 1]], "logps": [[-1, -1, -1, -1]]})

    rollout = ServerGenerator(serve(engine), _Tokenizer()).generate([[3]], 1, SamplingSettings())
    assert rollout.completion_mask.tolist() == [[1, 0, 1, 1]] and rollout.has_eos.tolist() == [True]
    assert rollout.texts == ["5 6"]

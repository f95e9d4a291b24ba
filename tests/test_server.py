"""``python -m mlx_redrafter.server`` as a subprocess on a free local port (127.0.0.1 only).

Driven by the official ``openai`` client and by raw HTTP: greedy texts (streamed and not)
equal ``generate``'s, 20 concurrent clients all get their own right text, malformed
requests get a 400 naming the problem while the server goes on, a client that leaves
mid-stream stops its generation, and SIGTERM with a request in flight exits cleanly."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tiny_models import save_tiny_model_dir

from mlx_redrafter.engine import generate
from mlx_redrafter.models import load

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server subprocess and helpers to talk to it."""

    def __init__(self, model_dir: Path | None, *flags: str):
        self.port = _free_port()
        model = [] if model_dir is None else ["--model", str(model_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_redrafter.server", *model]
            + ["--port", str(self.port), *flags],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
        raise RuntimeError("the server did not start")

    def conn(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, dict]:
        c = self.conn(5)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read())

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        c = self.conn()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c.request("POST", path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())

    def stream(self, path: str, body: dict) -> list[dict]:
        c = self.conn()
        c.request("POST", path, json.dumps({**body, "stream": True}))
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        events = []
        for line in r.read().decode().split("\n\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
        return events

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("server") / "tiny"
    return save_tiny_model_dir(path, seed=7, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir):
    running = Running(model_dir, "--prompt-lookup", "--num-draft-tokens", "3")
    yield running
    assert running.stop() == 0


def _chat_text(loaded, content: str, max_tokens: int) -> str:
    model, tokenizer = loaded
    messages = [{"role": "user", "content": content}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def test_openai_client_streamed_and_not_equal_generate(server, loaded):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none")
    messages = [{"role": "user", "content": "the cat sat on the mat"}]
    want = _chat_text(loaded, messages[0]["content"], 24)
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == want
    assert reply.usage.completion_tokens == 24 and reply.choices[0].finish_reason == "length"
    decoding = reply.model_extra["decoding"]
    assert decoding["speculative"] and decoding["tokens_per_step"] >= 1.0
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # the same conversation again: its prompt comes from the cache (all but the last token)
    assert (
        chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
    )
    model, tokenizer = loaded
    completion = client.completions.create(model="tiny", prompt="hello world", max_tokens=16)
    assert completion.choices[0].text == generate(model, tokenizer, "hello world", max_tokens=16)
    assert [m.id for m in client.models.list().data] == [str(server_model(server))]


def server_model(server) -> str:
    return server.get("/v1/models")[1]["data"][0]["id"]


def test_raw_http_stream_and_a_second_turn_on_the_cache(server, loaded):
    first = "hello world 123"
    want = _chat_text(loaded, first, 16)
    body = {"messages": [{"role": "user", "content": first}], "max_tokens": 16}
    events = server.stream("/v1/chat/completions", body)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    # turn 2 extends turn 1: the cache covers turn 1 (its prompt and the reply)
    messages = [*body["messages"], {"role": "assistant", "content": want}]
    messages.append({"role": "user", "content": "a b c"})
    status, reply = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 8})
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert status == 200
    assert reply["choices"][0]["message"]["content"] == generate(
        model, tokenizer, prompt, max_tokens=8
    )
    first_prompt = events[-1]["usage"]["prompt_tokens"]
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > first_prompt
    assert server.get("/health")[1]["status"] == "ok"


def test_twenty_concurrent_clients_then_a_malformed_burst(server, loaded):
    contents = [f"the cat {i} sat" for i in range(20)]
    wanted = [_chat_text(loaded, c, 6) for c in contents]

    def ask(content: str) -> str:
        status, reply = server.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": content}], "max_tokens": 6},
        )
        assert status == 200, reply
        return reply["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(ask, contents))
    assert got == wanted
    long_prompt = "the cat sat on the mat " * 60  # past the 256-token context
    bad = {
        b'{"messages": [': "malformed JSON",
        b"[1, 2]": "must be an object",
        b'{"messages": "hi"}': "'messages'",
        b'{"messages": [{"role": "user", "content": 5}]}': "content",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}': "'max_tokens'",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}': "'max_tokens'",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}': "temperature",
        b'{"messages": [{"role": "user", "content": "x"}], "stop": 3}': "'stop'",
        b'{"messages": [{"role": "user", "content": "x"}], "seed": 1.5}': "'seed'",
        json.dumps({"messages": [{"role": "user", "content": long_prompt}]}).encode(): "context",
    }
    for raw, named in bad.items():
        status, reply = server.post("/v1/chat/completions", raw)
        assert status == 400 and named in reply["error"]["message"], (raw[:40], reply)
    status, reply = server.post("/v1/completions", {"prompt": "a b c", "max_tokens": -1})
    assert status == 400 and "'max_tokens'" in reply["error"]["message"]
    assert ask(contents[3]) == wanted[3]


def test_stop_and_seed_are_honoured(server, loaded):
    want = _chat_text(loaded, "the cat sat on the mat", 24)
    stop = want[5:8]
    body = {"messages": [{"role": "user", "content": "the cat sat on the mat"}], "max_tokens": 24}
    status, reply = server.post("/v1/chat/completions", {**body, "stop": [stop]})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["message"]["content"] == want[: want.index(stop)]
    events = server.stream("/v1/chat/completions", {**body, "stop": stop})
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        == want[: want.index(stop)]
    )
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    texts = [server.post("/v1/chat/completions", sampled)[1] for _ in range(2)]
    assert texts[0]["choices"] == texts[1]["choices"]


def test_a_client_leaving_mid_stream_stops_its_generation(server, loaded):
    before = server.get("/health")[1]
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps(
        {"prompt": "the cat", "max_tokens": CONTEXT - 8, "stream": True, "temperature": 0}
    ).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    received = b""
    while b"data: " not in received:  # the headers, then the first event
        received += sock.recv(4096)
    sock.close()
    want = _chat_text(loaded, "a b c", 8)
    status, reply = server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 8},
    )
    assert status == 200 and reply["choices"][0]["message"]["content"] == want
    after = server.get("/health")[1]
    assert after["cancelled"] == before["cancelled"] + 1


def test_sigterm_with_a_request_in_flight_exits_cleanly(model_dir):
    running = Running(model_dir)  # AR: the tiny model has no shipped head
    body = {"prompt": "the cat", "max_tokens": CONTEXT - 8, "stream": True}
    lines: list[bytes] = []
    started = threading.Event()

    def client() -> None:
        c = running.conn()
        c.request("POST", "/v1/completions", json.dumps(body))
        r = c.getresponse()
        while line := r.fp.readline():
            lines.append(line)
            started.set()

    thread = threading.Thread(target=client)
    thread.start()
    assert started.wait(60)
    assert running.stop() == 0
    thread.join(30)
    assert not thread.is_alive()
    assert lines[-2:] == [b"data: [DONE]\n", b"\n"]  # the stream was closed properly
    assert b"shutting down" in b"".join(lines) or b"finish_reason" in b"".join(lines)
    status = running.proc.stdout.read()
    assert "shutting down" in status


@pytest.mark.real_model
def test_default_model_is_served_speculatively():
    """No flags: the default model with its shipped head (few tokens)."""
    try:
        model, tokenizer = load(None)
    except Exception as e:  # noqa: BLE001 - the default model could not be had
        pytest.skip(f"default model not available: {e}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    want = generate(model, tokenizer, prompt, max_tokens=8)
    running = Running(None)
    try:
        status, reply = running.post(
            "/v1/chat/completions", {"messages": messages, "max_tokens": 8}
        )
    finally:
        assert running.stop() == 0
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["decoding"]["speculative"] and reply["decoding"]["steps"] >= 1


def test_bad_flags_exit_2_with_one_line(capsys):
    from mlx_redrafter import server

    assert server.main(["--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --max-tokens must be positive, got 0"
    ]

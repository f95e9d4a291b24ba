"""``python -m mlx_redrafter.server``: an OpenAI-compatible HTTP server with speculative decoding.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (non-streaming, or
server-sent events with ``"stream": true``), ``GET /v1/models`` and ``GET /health``.
Responses carry OpenAI's ``usage`` (with ``prompt_tokens_details.cached_tokens``) and a
``decoding`` field with the speculative statistics (tokens per step, acceptance by depth).

The HTTP side is the standard library's ``ThreadingHTTPServer`` (as ``mlx_lm.server``):
each connection's thread checks the JSON body and queues a :class:`Job`; one worker thread
owns the model, the tokenizer, the drafter and one prompt cache, and serves the jobs one
at a time in arrival order. A request whose conversation extends the previous one reuses
its cache (only the new tokens are prefilled). A client that goes away stops its
generation; SIGTERM (or SIGINT) cancels the current request, answers the queued ones with
503 and exits with status 0. It binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import queue
import select
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import mlx.core as mx

from mlx_redrafter.cli import CLIError, build_drafter, drafter_kind
from mlx_redrafter.engine import StepStats, stream_generate
from mlx_redrafter.generate import add_decoding_arguments
from mlx_redrafter.prompt_cache import make_prompt_cache

#: Seconds between checks that a waiting client is still connected.
POLL_S = 0.05
#: Most stop sequences a request may give (OpenAI's limit).
MAX_STOPS = 4


class RequestError(ValueError):
    """A bad request: answered 400 with this message (``param``: the field at fault)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------- requests


def _number(body: dict, name: str, low: float, high: float, default: float | None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {type(value).__name__}", name)
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(f"messages[{index}].content: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: a text part needs a 'text' string")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(
        f"messages[{index}].content must be a string or a list of text parts", "messages"
    )


@dataclass
class Settings:
    """One request's checked settings."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_settings(body: dict, default_max_tokens: int, default_temp: float) -> Settings:
    """The sampling fields of a request body, checked (raises :class:`RequestError`)."""
    max_tokens = _integer(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max_tokens)
        name = "max_tokens"
    else:
        name = "max_completion_tokens"
    if max_tokens <= 0:
        raise RequestError(f"'{name}' must be a positive integer, got {max_tokens}", name)
    temperature = _number(body, "temperature", 0.0, 2.0, default_temp)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be greater than 0", "top_p")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOPS:
        raise RequestError(f"'stop' takes at most {MAX_STOPS} sequences", "stop")
    seed = _integer(body, "seed", None)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    n = _integer(body, "n", 1)
    if n != 1:
        raise RequestError("'n' must be 1 (one completion per request)", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    return Settings(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def parse_chat(body: dict) -> list[dict[str, str]]:
    """The ``messages`` of a chat request, checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role' string", "messages")
        out.append({"role": message["role"], "content": _content(message, i)})
    return out


def parse_completion(body: dict) -> str | list[int]:
    """The ``prompt`` of a completion request, checked (a string or token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return prompt
    raise RequestError("'prompt' must be a non-empty string or list of token ids", "prompt")


# ----------------------------------------------------------------------------- worker


@dataclass
class Job:
    """A queued request; the worker puts events ``(kind, payload)`` on ``events``."""

    kind: str  # "chat" or "completion"
    payload: Any  # messages or prompt
    settings: Settings
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` may start a stop sequence."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = max(keep, k)
                break
    return keep


class Worker:
    """Owns the model and serves queued jobs one at a time, in arrival order."""

    def __init__(self, model, tokenizer, drafter, shapes: dict[bool, tuple[int, int]], name: str):
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.shapes = shapes
        self.name = name
        self.cache = make_prompt_cache(model)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
        self.stopping = threading.Event()
        self.counts = {"served": 0, "cancelled": 0, "rejected": 0}
        self.relaying = 0  # responses being written
        self.lock = threading.Lock()
        limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
        self.context = limit if isinstance(limit, int) and limit > 0 else None
        self.thread: threading.Thread | None = None  # the thread that runs :meth:`run`

    def submit(self, job: Job) -> None:
        """Queue ``job`` (answered 503 when the server is stopping)."""
        if self.stopping.is_set():
            job.events.put(("error", (503, "the server is shutting down")))
            return
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel the current job, answer the queued ones 503 and end the thread."""
        self.stopping.set()
        job = self.current
        if job is not None:
            job.cancelled.set()
        self.jobs.put(None)
        if self.thread is not None:
            self.thread.join(timeout=60)

    def run(self) -> None:
        """Serve jobs until :meth:`stop` (in the thread that loaded the model)."""
        while True:
            job = self.jobs.get()
            if job is None:
                break
            if self.stopping.is_set():
                job.events.put(("error", (503, "the server is shutting down")))
                continue
            self.current = job
            try:
                self._serve(job)
            except RequestError as e:
                job.events.put(("error", (400, str(e), e.param)))
                self._count("rejected")
            except Exception as e:  # noqa: BLE001 - one request's failure, the server goes on
                job.events.put(("error", (500, f"{type(e).__name__}: {e}")))
            finally:
                self.current = None
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            if job is not None:
                job.events.put(("error", (503, "the server is shutting down")))

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _prompt(self, job: Job) -> list[int]:
        tok = self.tokenizer
        if job.kind == "chat":
            if getattr(tok, "chat_template", None) is None:
                return tok.encode("".join(m["content"] for m in job.payload))
            return list(tok.apply_chat_template(job.payload, add_generation_prompt=True))
        if isinstance(job.payload, list):
            vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
            if vocab and max(job.payload) >= vocab:
                raise RequestError(f"'prompt' has token ids >= the vocabulary ({vocab})", "prompt")
            return list(job.payload)
        bos = tok.bos_token
        return tok.encode(
            job.payload, add_special_tokens=bos is None or not job.payload.startswith(bos)
        )

    def _serve(self, job: Job) -> None:
        settings = job.settings
        prompt = self._prompt(job)
        if self.context is not None and len(prompt) >= self.context:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; the model's context is {self.context}",
                "messages" if job.kind == "chat" else "prompt",
            )
        if settings.seed is not None:
            mx.random.seed(settings.seed)
        sampling = settings.temperature > 0
        width, length = self.shapes[sampling]
        new = self.cache.continuation(prompt)
        stats = StepStats()
        job.events.put(("start", None))
        text, sent, finish, last = "", 0, None, None
        for response in stream_generate(
            self.model,
            self.tokenizer,
            new,
            max_tokens=settings.max_tokens,
            drafter=self.drafter,
            beam_width=width,
            beam_length=length,
            temp=settings.temperature,
            top_p=settings.top_p if settings.top_p < 1.0 else 0.0,
            prompt_cache=self.cache,
            stats=stats,
        ):
            last = response
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            text += response.text
            hit = [text.find(s) for s in settings.stop if s in text]
            if hit:
                text, finish = text[: min(hit)], "stop"
                break
            finish = response.finish_reason
            ready = len(text) - (_held_back(text, settings.stop) if finish is None else 0)
            if ready > sent:
                job.events.put(("delta", text[sent:ready]))
                sent = ready
        if finish == "cancelled":
            self._count("cancelled")
            job.events.put(("cancelled", None))
            return
        if len(text) > sent:
            job.events.put(("delta", text[sent:]))
        self._count("served")
        job.events.put(
            ("done", (finish or "length", self._usage(prompt, last, stats, width, length)))
        )

    def _usage(self, prompt: list[int], last, stats: StepStats, width: int, length: int) -> dict:
        generated = last.generation_tokens if last is not None else 0
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": generated,
            "total_tokens": len(prompt) + generated,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        }
        decoding = {
            "speculative": self.drafter is not None,
            "drafter": type(self.drafter).__name__ if self.drafter is not None else None,
            "beam_width": width if self.drafter is not None else None,
            "beam_length": length if self.drafter is not None else None,
            "steps": stats.steps if self.drafter is not None else generated,
            "tokens_per_step": (
                (generated - 1) / max(stats.steps, 1) if self.drafter is not None else 1.0
            ),
            "acceptance_by_depth": last.acceptance_by_depth if last is not None else [],
            "prefill_tokens": stats.prefill_tokens,
            "prompt_tps": last.prompt_tps if last is not None else 0.0,
            "generation_tps": last.generation_tps if last is not None else 0.0,
        }
        return {"usage": usage, "decoding": decoding}


# ----------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """One connection: checks the request, queues it and relays the worker's events."""

    protocol_version = "HTTP/1.1"
    server_version = "mlx-redrafter"
    worker: Worker
    defaults: tuple[int, float]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": None}}
        )

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            with self.worker.lock:
                counts = dict(self.worker.counts)
            self._json(200, {"status": "ok", "queued": self.worker.jobs.qsize(), **counts})
        elif path == "/v1/models":
            model = {"id": self.worker.name, "object": "model", "created": 0, "owned_by": "local"}
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no such endpoint: GET {path}")

    def do_POST(self) -> None:  # noqa: N802 - the base's name
        path = self.path.split("?")[0].rstrip("/")
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
        length = self.headers.get("Content-Length")
        try:
            body_bytes = self.rfile.read(int(length)) if length else b""
        except ValueError:
            self.close_connection = True
            return self._error(400, "bad Content-Length header")
        if path not in kinds:
            return self._error(404, f"no such endpoint: POST {path}")
        try:
            try:
                body = json.loads(body_bytes)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"malformed JSON body: {e}") from None
            if not isinstance(body, dict):
                raise RequestError("the JSON body must be an object")
            settings = parse_settings(body, *self.defaults)
            kind = kinds[path]
            payload = parse_chat(body) if kind == "chat" else parse_completion(body)
        except RequestError as e:
            with self.worker.lock:
                self.worker.counts["rejected"] += 1
            return self._error(400, str(e), e.param)
        job = Job(kind, payload, settings)
        with self.worker.lock:
            self.worker.relaying += 1
        try:
            self.worker.submit(job)
            self._relay(job)
        finally:
            with self.worker.lock:
                self.worker.relaying -= 1

    def _gone(self) -> bool:
        """Whether the client closed its side of the connection."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            import socket

            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _next(self, job: Job):
        """The job's next event; ``None`` if the client left meanwhile (job cancelled)."""
        while True:
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._gone():
                    job.cancelled.set()
                    return None

    def _relay(self, job: Job) -> None:
        event = self._next(job)
        if event is None:
            return
        kind, payload = event
        if kind == "error":
            return self._error(*payload)
        rid = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if job.settings.stream:
            return self._stream(job, rid, created)
        text = ""
        while True:
            event = self._next(job)
            if event is None:
                return
            kind, payload = event
            if kind == "delta":
                text += payload
            elif kind == "cancelled":
                return self._error(503, "the request was cancelled: the server is shutting down")
            elif kind == "error":
                return self._error(*payload)
            else:
                finish, extra = payload
                break
        if job.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        body = {"id": rid, "object": obj, "created": created, "model": self.worker.name}
        self._json(200, {**body, "choices": [choice], **extra})

    def _stream(self, job: Job, rid: str, created: int) -> None:
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        chat = job.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.worker.name}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {**head, "choices": [choice]}

        try:
            if chat:
                self._send_event(chunk("", None, role=True))
            while True:
                event = self._next(job)
                if event is None:
                    return
                kind, payload = event
                if kind == "delta":
                    self._send_event(chunk(payload, None))
                elif kind in ("cancelled", "error"):
                    message = "the server is shutting down" if kind == "cancelled" else payload[1]
                    self._send_event({"error": {"message": message, "type": "server_error"}})
                    break
                else:
                    finish, extra = payload
                    final = chunk(None, finish)
                    final["decoding"] = extra["decoding"]
                    if not job.settings.include_usage:
                        final["usage"] = extra["usage"]
                    self._send_event(final)
                    if job.settings.include_usage:
                        self._send_event({**head, "choices": [], **extra})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()

    def _send_event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """A thread per connection and a deep accept queue. Idle keep-alive connections do
    not hold up an exit: ``main`` waits for the responses in flight (``Worker.relaying``)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mlx_redrafter.server`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.server",
        description="OpenAI-compatible server with lossless speculative decoding.",
    )
    add_decoding_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-requests", action="store_true", help="log every HTTP request")
    return p


def make_worker(args: argparse.Namespace) -> Worker:
    """Load the model and drafter the flags name; the worker is not started."""
    from mlx_redrafter.models import load

    if args.max_tokens <= 0:
        raise CLIError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.seed is not None:
        mx.random.seed(args.seed)
    drafter_kind(args)
    model, tokenizer = load(args.model, dtype=args.dtype)
    drafter, greedy_shape = build_drafter(args, model, tokenizer, args.acceptance)
    sampled = argparse.Namespace(**{**vars(args), "temp": 1.0})
    _, sampling_shape = build_drafter(sampled, model, tokenizer, args.acceptance)
    from mlx_redrafter.default_model import MODEL_NAME

    name = args.model or MODEL_NAME
    return Worker(model, tokenizer, drafter, {False: greedy_shape, True: sampling_shape}, name)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM or SIGINT."""
    from mlx_redrafter.models import ModelLoadError

    args = build_parser().parse_args(argv)
    # MLX streams belong to threads: the model is loaded in the thread that runs it
    loaded: dict[str, Any] = {}
    ready = threading.Event()

    def generation() -> None:
        try:
            loaded["worker"] = make_worker(args)
        except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as e:
            loaded["error"] = e
        finally:
            ready.set()
        if "worker" in loaded:
            loaded["worker"].run()

    thread = threading.Thread(target=generation, name="generation", daemon=True)
    thread.start()
    ready.wait()
    try:
        if "error" in loaded:
            raise loaded["error"]
        worker = loaded["worker"]
        worker.thread = thread
        handler = type("BoundHandler", (Handler,), {"worker": worker})
        handler.defaults = (args.max_tokens, args.temp)
        server = Server((args.host, args.port), handler)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.verbose = args.log_requests
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    serving.start()
    host, port = server.server_address[:2]
    speculative = "on" if worker.drafter is not None else "off"
    print(f"serving {worker.name} on http://{host}:{port} (speculative {speculative})", flush=True)
    while not stop.wait(0.5):
        pass
    print("shutting down", flush=True)
    worker.stop()
    server.shutdown()
    serving.join()
    deadline = time.monotonic() + 10
    while worker.relaying and time.monotonic() < deadline:
        time.sleep(0.05)  # the cancelled and refused requests get their answers
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

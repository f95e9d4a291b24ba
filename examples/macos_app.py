"""How a macOS app serves a chat window from Python: one model, one worker thread, many requests.

The app creates one :class:`Engine` at launch: its worker thread loads the model and the
drafter once and then serves requests from a queue, in order. The UI thread submits a
prompt with a callback that receives each decoded text piece (the app forwards it to the
main thread, e.g. with ``DispatchQueue.main.async`` or ``AppHelper.callAfter``), and can
cancel a request at any time: the worker stops streaming at the next token, closes the
generator (which frees its caches) and goes on with the next request.

All MLX work runs on the worker thread, so the UI never blocks on a forward pass. The
worker calls ``mx.clear_streams()`` before it ends: MLX wants each thread that used it to
free its streams itself, or the process may abort when it exits ("terminate called without
an active exception").

    python examples/macos_app.py [--model DIR] [--drafter DIR|default|none] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx_redrafter  # first: routes MLX's BLAS to OpenBLAS on Linux
from mlx_redrafter import load, load_drafter, stream_generate

# isort: split
import mlx.core as mx


@dataclass
class Request:
    """One prompt; :meth:`wait` returns its stats, :meth:`cancel` (or setting ``stop``, an
    event the app may own, e.g. bound to a Stop button) ends it at the next token."""

    prompt: str
    on_text: Callable[[str], None]
    max_tokens: int = 128
    text: str = ""
    stats: dict = field(default_factory=dict)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the worker to stop this request (safe from any thread, also before it starts)."""
        self.stop.set()

    @property
    def cancelled(self) -> bool:
        return self.stop.is_set()

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the request is finished or cancelled; returns its stats."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.stats


class Engine:
    """A model and drafter loaded once on a worker thread that serves :class:`Request` s."""

    def __init__(self, model_path: str | None = None, drafter_path: str | None = "default"):
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, args=(model_path, drafter_path), daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(
        self,
        prompt: str,
        on_text: Callable[[str], None],
        max_tokens: int = 128,
        stop: threading.Event | None = None,
    ) -> Request:
        """Queue a chat prompt; ``on_text`` is called on the worker thread for every piece,
        and setting ``stop`` (from any thread) cancels the request."""
        request = Request(prompt, on_text, max_tokens)
        if stop is not None:
            request.stop = stop
        self._queue.put(request)
        return request

    def close(self) -> None:
        """Finish the queued requests, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _serve(self, model_path: str | None, drafter_path: str | None) -> None:
        try:
            self._load_and_serve(model_path, drafter_path)
        finally:
            mx.clear_streams()  # this thread's MLX streams, freed before the process exits

    def _load_and_serve(self, model_path: str | None, drafter_path: str | None) -> None:
        try:
            self.model, self.tokenizer = load(model_path)
            self.drafter = None
            if drafter_path == "default":
                if model_path is None and mlx_redrafter.DEFAULT_HEAD.is_dir():
                    self.drafter = load_drafter(mlx_redrafter.DEFAULT_HEAD, model=self.model)
            elif drafter_path not in (None, "none"):
                self.drafter = load_drafter(drafter_path, model=self.model)
        except Exception as e:  # reported to the constructor's caller
            self._load_error = e
        self._ready.set()
        if self._load_error is not None:
            return
        while (request := self._queue.get()) is not None:
            try:
                self._run(request)
            except Exception as e:  # one failing request must not stop the worker
                request.error = e
            request._done.set()

    def _run(self, request: Request) -> None:
        messages = [{"role": "user", "content": request.prompt}]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        start = time.perf_counter()
        tokens, response, cancelled = 0, None, request.cancelled
        if not cancelled:
            stream = stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=request.max_tokens,
                drafter=self.drafter,
            )
            try:
                for response in stream:
                    tokens += 1
                    request.text += response.text
                    request.on_text(response.text)
                    if request.cancelled and response.finish_reason is None:
                        cancelled = True
                        break
            finally:
                stream.close()  # runs the generator's cleanup now, not at garbage collection
        request.stats = {
            "tokens": tokens,
            "finish_reason": "cancelled" if cancelled else getattr(response, "finish_reason", None),
            "tokens_per_second": response.generation_tps if response else 0.0,
            "tokens_per_step": response.tokens_per_step if response else 0.0,
            "seconds": time.perf_counter() - start,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--drafter", default="default")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cancel-after", type=int, default=8, help="tokens before the cancel")
    args = parser.parse_args()

    engine = Engine(args.model, args.drafter)
    prompts = [
        "What is the capital of France?",
        "Write a long story about a lighthouse keeper.",  # cancelled mid-way below
        "Name three primary colors.",
    ]
    requests: list[Request] = []
    for i, prompt in enumerate(prompts):
        pieces: list[str] = []
        stop = threading.Event()  # a Stop button sets it; any thread may

        def on_text(piece: str, i=i, pieces=pieces, stop=stop) -> None:
            pieces.append(piece)
            if i == 1 and len(pieces) == args.cancel_after:
                stop.set()

        requests.append(engine.submit(prompt, on_text, args.max_tokens, stop))
    for i, request in enumerate(requests):
        stats = request.wait()
        print(f"[{i}] {request.prompt!r} -> {request.text!r}")
        print(
            f"[{i}] {stats['tokens']} tokens, {stats['finish_reason']}, "
            f"{stats['tokens_per_second']:.1f} tok/s, {stats['tokens_per_step']:.2f} tokens/step"
        )
    engine.close()


if __name__ == "__main__":
    main()

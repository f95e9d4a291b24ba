"""MT-Bench two-turn conversations through mlx-redrafter's server and ``mlx_lm.server``.

Both servers run the same model on local ports; each conversation goes to both, in
alternating order (interleaved), greedy, streamed. Turn 2 re-sends turn 1 and the reply,
so a server that keeps the conversation's cache prefills only the new message. Reported:
time to first token of turn 2 and generation tokens/s (median and interquartile range).

    python examples/bench_server.py --conversations 10 --max-tokens 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mt_bench.jsonl"


BASELINE = "import mlx_redrafter; from mlx_lm.server import main; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{' '.join(command[:3])} did not start")


def chat(port: int, messages: list[dict], max_tokens: int) -> tuple[str, float, float]:
    """``(text, seconds to the first content, seconds from it to the end)``."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start_t = time.perf_counter()
    c.request("POST", "/v1/chat/completions", json.dumps(body))
    r = c.getresponse()
    text, first = "", None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece and first is None:
                first = time.perf_counter()
            text += piece
    end = time.perf_counter()
    first = first or end
    return text, first - start_t, end - first


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{statistics.median(values):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir (default: the default model)")
    p.add_argument("--conversations", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    import mlx_redrafter  # noqa: F401 - before mlx

    # isort: split
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_redrafter.models import resolve_model_path

    model = str(resolve_model_path(args.model))
    tokenizer = load_tokenizer(Path(model))
    ports = {"mlx-redrafter": free_port(), "mlx_lm.server": free_port()}
    commands = {
        "mlx-redrafter": [sys.executable, "-m", "mlx_redrafter.server"]
        + (["--model", model] if args.model else [])
        + ["--port", str(ports["mlx-redrafter"])],
        # the same BLAS for both: importing mlx_redrafter first loads the fast CPU GEMM
        # (see mlx_redrafter/_blas.py), which a bare ``python -m mlx_lm.server`` would not
        "mlx_lm.server": [sys.executable, "-c", BASELINE, "--model", model]
        + ["--port", str(ports["mlx_lm.server"])],
    }
    # a SIGTERM to this script still stops both servers (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    procs = {name: start(cmd, ports[name]) for name, cmd in commands.items()}
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][: args.conversations]
    ttft: dict[str, list[float]] = {name: [] for name in ports}
    tps: dict[str, list[float]] = {name: [] for name in ports}
    texts: dict[str, list[str]] = {name: [] for name in ports}
    try:
        for i, row in enumerate(rows):
            order = list(ports) if i % 2 == 0 else list(ports)[::-1]
            for name in order:
                messages = [{"role": "user", "content": row["turns"][0]}]
                reply, _, _ = chat(ports[name], messages, args.max_tokens)
                messages += [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": row["turns"][1]},
                ]
                text, first, rest = chat(ports[name], messages, args.max_tokens)
                count = len(tokenizer.encode(text, add_special_tokens=False))
                texts[name].append(reply + "\x00" + text)
                ttft[name].append(first)
                tps[name].append((count - 1) / rest if rest > 0 and count > 1 else 0.0)
            print(f"conversation {i + 1}/{len(rows)} done", file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"{len(rows)} MT-Bench conversations, greedy, max_tokens {args.max_tokens}, {model}")
    same = sum(a == b for a, b in zip(*texts.values(), strict=True))
    print(f"identical two-turn texts: {same}/{len(rows)}")
    for name in ports:
        print(f"{name:14s} turn-2 TTFT s {spread(ttft[name])}  gen tok/s {spread(tps[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

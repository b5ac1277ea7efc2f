"""Load run against `selfextend-rs serve` over HTTP: many requests from concurrent
clients, some hanging up mid-stream; checks that nothing is lost or duplicated and
that memory returns to its idle level.

    .venv/bin/python bench/serve_load.py [--model PATH] [--requests 200] [--clients 16]
        [--disconnect-every 5] [--json OUT]

Starts the server as a subprocess on a free port (build the optimised extension
first: `maturin develop --profile opt`), warms it up, records its resident memory
(VmRSS) and /metrics, then sends the requests: a mix of streamed and whole
completions and chat completions of 8-48 tokens, sampled with per-request seeds.
Every `--disconnect-every`-th streamed request hangs up after its second event.
Afterwards it checks that every other request finished exactly once (status 200, one
`[DONE]`, a unique id, `usage` consistent with what was streamed), that the engine
is idle (nothing queued or running, no KV bytes reserved), and reports memory.
Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

TOPICS = ["the sea", "a lighthouse", "winter", "a library", "trains", "the moon", "bread", "a garden"]


@dataclass
class Outcome:
    index: int
    kind: str
    hung_up: bool = False
    status: int = 0
    ids: set[str] = field(default_factory=set)
    done_markers: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        match = None
    return match.group(1) if match else platform.machine()


def _rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


async def _metrics(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    return {name: float(value) for name, value in re.findall(r"^(selfextend_\w+) (\S+)$", text, re.M)}


def _request(i: int, rng: random.Random, disconnect_every: int) -> tuple[str, dict[str, Any], bool]:
    topic = rng.choice(TOPICS)
    tokens = rng.randint(8, 48)
    common = {"max_tokens": tokens, "temperature": 0.8, "top_p": 0.95, "seed": i}
    kind = ["stream", "chat", "stream", "complete"][i % 4]
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": f"Write two sentences about {topic}."}],
                "stream": i % 8 == 1, **common}
        return "/v1/chat/completions", body, False
    body = {"prompt": f"A short story about {topic}:", "stream": kind == "stream", **common}
    hang_up = kind == "stream" and (i // 2) % disconnect_every == 0
    return "/v1/completions", body, hang_up


async def _one(http: httpx.AsyncClient, i: int, path: str, body: dict[str, Any], hang_up: bool) -> Outcome:
    out = Outcome(i, path.rsplit("/", 1)[-1] + (" stream" if body["stream"] else ""), hung_up=hang_up)
    t0 = time.perf_counter()
    chat = path.endswith("chat/completions")
    try:
        if not body["stream"]:
            r = await http.post(path, json=body)
            out.status = r.status_code
            data = r.json()
            if r.status_code == 200:
                out.ids.add(data["id"])
                choice = data["choices"][0]
                out.text = choice["message"]["content"] if chat else choice["text"]
                out.finish_reason = choice["finish_reason"]
                out.completion_tokens = data["usage"]["completion_tokens"]
            else:
                out.error = data["error"]["message"]
            return out
        body = {**body, "stream_options": {"include_usage": True}}
        async with http.stream("POST", path, json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode()
                return out
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    out.done_markers += 1
                    continue
                event = json.loads(payload)
                out.ids.add(event["id"])
                if event.get("usage"):
                    out.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    out.text += (choice.get("delta", {}).get("content") or "") if chat else choice["text"]
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                events += 1
                if hang_up and events == 2:
                    break
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.seconds = time.perf_counter() - t0
    return out


async def load(base: str, requests: int, clients: int, disconnect_every: int, pid: int) -> dict[str, Any]:
    rng = random.Random(0)
    work = [(i, *_request(i, rng, disconnect_every)) for i in range(requests)]
    queue: asyncio.Queue[tuple[int, str, dict[str, Any], bool]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    outcomes: list[Outcome] = []
    peak_rss = 0
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        for i in range(4):  # warm-up: weights paged in, pools started
            await _one(http, -1 - i, *_request(i, random.Random(i), disconnect_every=10**9))
        idle_rss, before = _rss_bytes(pid), await _metrics(http)

        async def client() -> None:
            while not queue.empty():
                i, path, body, hang_up = queue.get_nowait()
                outcomes.append(await _one(http, i, path, body, hang_up))

        async def watch() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, _rss_bytes(pid))
                await asyncio.sleep(0.2)

        watcher = asyncio.ensure_future(watch())
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        # Hung-up requests are cancelled at the engine's next step.
        deadline = time.monotonic() + 30
        after = await _metrics(http)
        while (after["selfextend_running_sequences"] or after["selfextend_queue_length"]) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = await _metrics(http)
        watcher.cancel()
        await asyncio.sleep(2)
        after_rss = _rss_bytes(pid)
        after = await _metrics(http)

    completed = [o for o in outcomes if not o.hung_up]
    hung_up = [o for o in outcomes if o.hung_up]
    all_ids = [i for o in outcomes for i in o.ids]
    problems = []
    if sorted(o.index for o in outcomes) != list(range(requests)):
        problems.append("requests lost or answered twice by the load generator")
    for o in completed:
        what = f"request {o.index} ({o.kind})"
        if o.status != 200 or o.error:
            problems.append(f"{what}: status {o.status}: {o.error}")
        elif len(o.ids) != 1:
            problems.append(f"{what}: {len(o.ids)} response ids")
        elif "stream" in o.kind and o.done_markers != 1:
            problems.append(f"{what}: {o.done_markers} [DONE] markers")
        elif o.finish_reason not in ("stop", "length") or not o.completion_tokens:
            problems.append(f"{what}: finish_reason {o.finish_reason}, {o.completion_tokens} tokens")
    if len(all_ids) != len(set(all_ids)):
        problems.append(f"{len(all_ids) - len(set(all_ids))} response ids seen twice")
    finished = after["selfextend_requests_finished_total"] - before["selfextend_requests_finished_total"]
    # A hung-up request may still finish if its last tokens were already computed.
    if not len(completed) <= finished <= len(outcomes):
        problems.append(f"the engine finished {finished:.0f} requests; {len(completed)} completed")
    for name in ("selfextend_running_sequences", "selfextend_queue_length", "selfextend_kv_cache_bytes"):
        if after[name] != 0:
            problems.append(f"after the run {name} = {after[name]:.0f}")
    # The engine hands freed memory back to the OS when it goes idle.
    if after_rss > idle_rss + max(idle_rss // 10, 32 * 2**20):
        problems.append(f"resident memory {after_rss / 2**20:.0f} MB after the run, "
                        f"{idle_rss / 2**20:.0f} MB idle before it")
    latencies = sorted(o.seconds for o in completed)
    generated = after["selfextend_generated_tokens_total"] - before["selfextend_generated_tokens_total"]
    return {
        "requests": requests, "clients": clients, "completed": len(completed), "hung_up": len(hung_up),
        "hung_up_ended_early": sum(1 for o in hung_up if o.done_markers == 0),
        "engine_finished": int(finished), "wall_seconds": round(wall, 2),
        "generated_tokens": int(generated), "generated_tokens_per_second": round(generated / wall, 1),
        "latency_median_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
        "rss_idle_mb": round(idle_rss / 2**20, 1), "rss_peak_mb": round(peak_rss / 2**20, 1),
        "rss_after_mb": round(after_rss / 2**20, 1),
        "kv_bytes_after": int(after["selfextend_kv_cache_bytes"]), "problems": problems,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model path (default: the bundled default model)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--disconnect-every", type=int, default=5,
                   help="every N-th streamed completion hangs up after two events (default 5)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    port = _free_port()
    command = [sys.executable, "-m", "selfextend_rs.cli", "serve", "--port", str(port), "--log-level", "warning",
               "--max-batch", str(args.max_batch)]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("error: the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        result = asyncio.run(load(base, args.requests, args.clients, args.disconnect_every, server.pid))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    result.update(cpu=_cpu_name(), cores=os.cpu_count(), max_batch=args.max_batch)
    for key, value in result.items():
        if key != "problems":
            print(f"{key:28s} {value}")
    for problem in result["problems"]:
        print(f"FAIL: {problem}")
    print("all checks passed" if not result["problems"] else f"{len(result['problems'])} check(s) failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

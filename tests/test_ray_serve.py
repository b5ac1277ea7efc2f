"""Ray Serve: the server's app as replicas behind Ray's HTTP proxy, on a local Ray
instance, answering the official `openai` client."""

from __future__ import annotations

import gc
import re
import socket
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import random_ids

import selfextend_rs as se

pytest.importorskip("starlette", reason='needs the "server" extra')
openai = pytest.importorskip("openai")
with warnings.catch_warnings():
    # Ray's modules warn about their own internals at import (pydantic deprecations).
    warnings.simplefilter("ignore")
    ray = pytest.importorskip("ray", reason='needs the "ray" extra')
    from ray import serve

    from selfextend_rs.ray_serve import app, build_app

# Ray's own modules warn about their internals (deprecations, resource probing).
pytestmark = [pytest.mark.usefixtures("quiet_context"), pytest.mark.filterwarnings("ignore")]


def test_build_app_reads_serve_run_arguments(model_path: Path) -> None:
    built = build_app({"model": str(model_path), "num_replicas": "2", "threads": "1", "self_extend": "3, 5",
                       "max_batch": "4", "kv_budget": "none"})
    assert isinstance(built, serve.Application)
    with pytest.raises(ValueError, match="unknown argument.*replicas"):
        build_app({"model": str(model_path), "replicas": "2"})
    with pytest.raises(ValueError, match="self_extend='8'.*G,W"):
        build_app({"model": str(model_path), "self_extend": "8"})
    with pytest.raises(ValueError, match="num_replicas='two'"):
        build_app({"model": str(model_path), "num_replicas": "two"})
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        build_app({"model": str(model_path), "num_replicas": "0"})
    with pytest.raises(se.ModelLoadError, match="no model at"):
        build_app({"model": str(model_path / "missing.gguf")})
    assert isinstance(build_app({"model": str(model_path), "kv_cache": "f16"}), serve.Application)
    with pytest.raises(ValueError, match="kv_cache='f8'"):
        build_app({"model": str(model_path), "kv_cache": "f8"})


@pytest.fixture(scope="module")
def proxy(model_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Logical CPUs: the two replicas below and the one-replica app of the disconnect test.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(model_path, num_replicas=2, threads=1, model_name="tiny", self_extend=None),
                  name="selfextend", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with warnings.catch_warnings():
            # Ray leaves client sockets for the garbage collector; collect them here,
            # quietly, rather than in whichever test runs next.
            warnings.simplefilter("ignore")
            serve.shutdown()
            ray.shutdown()
            gc.collect()


def test_two_replicas_answer_concurrent_requests(proxy: str, model: se.Model) -> None:
    replicas = serve.status().applications["selfextend"].deployments["selfextend"].replica_states
    assert replicas == {"RUNNING": 2}
    api = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0)
    prompts = [random_ids(12 + i, model.config.vocab_size, seed=i) for i in range(8)]

    def complete(prompt: list[int]) -> Any:
        return api.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(complete, prompts))
    for prompt, answer in zip(prompts, answers):
        expected = model.generate(prompt, 6)
        assert answer.choices[0].text == expected.text
        assert answer.usage.completion_tokens == len(expected.token_ids)

    streamed = api.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0,
                                      stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == answers[0].choices[0].text
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="other", prompt="x", max_tokens=1)


def _metrics(base: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(selfextend_\w+) ([0-9.e+-]+)$", text, flags=re.M)}


def test_a_client_that_disconnects_behind_the_proxy_cancels_its_sequence(
        proxy: str, model: se.Model, model_path: Path) -> None:
    """Ray's proxy passes the hang-up on to the replica, whose engine drops the sequence:
    it neither runs to its end nor holds its KV cache."""
    import httpx

    # One replica, so that its /metrics are the engine that ran the request.
    serve.run(app(model_path, num_replicas=1, threads=1, model_name="tiny", self_extend=None,
                  name="single"), name="single", route_prefix="/single")
    try:
        base = proxy.replace("/v1", "/single")
        # A prompt whose greedy continuation runs the full 2000 tokens (no EOS): only the
        # hang-up can end it early.
        prompt = next((p for p in (random_ids(8, model.config.vocab_size, seed=s) for s in range(50))
                       if model.generate(p, 2000).finish_reason == "length"), None)
        assert prompt is not None, "no seed gives a 2000-token greedy continuation"
        before = _metrics(base)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # one event, then hang up
        deadline = time.monotonic() + 30
        while (now := _metrics(base))["selfextend_running_sequences"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert now["selfextend_running_sequences"] == 0 and now["selfextend_kv_cache_bytes"] == 0
        # Cancelled, not run to the end.
        assert now["selfextend_requests_finished_total"] == before["selfextend_requests_finished_total"]
        generated = now["selfextend_generated_tokens_total"] - before["selfextend_generated_tokens_total"]
        assert 1 <= generated < 2000
    finally:
        serve.delete("single")

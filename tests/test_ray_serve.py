"""Ray Serve: the server's app as replicas behind Ray's HTTP proxy, on a local Ray
instance, answering the official `openai` client."""

from __future__ import annotations

import gc
import socket
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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

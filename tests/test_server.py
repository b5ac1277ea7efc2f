"""The OpenAI-compatible server: responses, streaming, errors, metrics, and the official
`openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import random_ids

import selfextend_rs as se

starlette = pytest.importorskip("starlette", reason='needs the "server" extra')
from starlette.testclient import TestClient  # noqa: E402

from selfextend_rs.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_context")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> se.Model:
    path = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(model_path, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return se.Model.load(path)


@pytest.fixture(scope="module")
def client(chat_model: se.Model) -> Any:
    app = create_app(chat_model, model_name="tiny", default_self_extend=None, max_queue=8)
    with TestClient(app) as c:
        yield c


def sse(text: str) -> list[Any]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_health_and_unknown_routes(client: Any) -> None:
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405


def test_completion_matches_generate(client: Any, chat_model: se.Model) -> None:
    prompt = random_ids(30, chat_model.config.vocab_size, seed=1)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "self_extend": {"group_size": 3, "window": 5}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = chat_model.generate(prompt, 12, self_extend=se.SelfExtend(3, 5))
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected.text
    assert data["choices"][0]["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[
        expected.finish_reason]
    assert data["usage"] == {"prompt_tokens": 30, "completion_tokens": len(expected.token_ids),
                             "total_tokens": 30 + len(expected.token_ids)}
    streamed = sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in streamed) == expected.text
    assert streamed[-1]["choices"][0]["finish_reason"] == data["choices"][0]["finish_reason"]


def test_chat_completion_and_its_stream(client: Any, chat_model: se.Model) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "The passkey is 4817."}]}]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0}
    data = client.post("/v1/chat/completions", json=body).json()
    flat = [messages[0], {"role": "user", "content": "The passkey is 4817."}]
    expected = chat_model.chat(flat, 10)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    events = sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == expected.text and events[-1]["usage"]["completion_tokens"] == len(expected.token_ids)


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "self_extend": {"group_size": 0, "window": 4}}, 400, "self_extend"),
    ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ({"prompt": [10 ** 6]}, 400, None),
    ({"prompt": "hi", "max_tokens": 10 ** 12}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors(client: Any, body: Any, status: int, param: Any) -> None:
    if isinstance(body, str):
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert client.get("/health").status_code == 200  # still serving


def test_a_full_queue_answers_429(chat_model: se.Model) -> None:
    app = create_app(chat_model, model_name="tiny", max_queue=0)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_metrics_count_the_work(client: Any) -> None:
    client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 3})
    text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    for name in ["selfextend_queue_length", "selfextend_running_sequences", "selfextend_kv_cache_bytes",
                 "selfextend_generated_tokens_per_second"]:
        assert name in values
    assert values["selfextend_generated_tokens_total"] >= 1
    assert values["selfextend_requests_finished_total"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_openai_client_works_unchanged(chat_model: se.Model) -> None:
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    app = create_app(chat_model, model_name="tiny", default_self_extend="auto")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in api.models.list()] == ["tiny"]
        messages = [{"role": "user", "content": "Say hi"}]
        reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        expected = chat_model.chat(messages, 8, self_extend="auto")
        assert reply.choices[0].message.content == expected.text
        pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)]
        assert "".join(pieces) == expected.text
        done = api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
        assert done.usage is not None and done.usage.completion_tokens <= 5
        with pytest.raises(openai.NotFoundError):
            api.completions.create(model="other", prompt="x", max_tokens=2)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_client_that_disconnects_cancels_its_sequence(chat_model: se.Model) -> None:
    httpx = pytest.importorskip("httpx")
    uvicorn = pytest.importorskip("uvicorn")
    # A prompt whose greedy continuation runs the full 300 tokens (no EOS), so only
    # the disconnect can end it early.
    prompt = next(p for p in (random_ids(8, chat_model.config.vocab_size, seed=s) for s in range(50))
                  if chat_model.generate(p, 300).finish_reason == "length")
    port = _free_port()
    app = create_app(chat_model, model_name="tiny", default_self_extend=None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    engine = app.state.server.engine
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"prompt": prompt, "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # one event, then hang up
        deadline = time.monotonic() + 30
        while engine.stats["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = engine.stats
        assert stats["running"] == 0 and stats["kv_bytes_reserved"] == 0
        assert stats["requests_finished_total"] == 0  # cancelled, not run to the end
        assert stats["generated_tokens_total"] < 300
    finally:
        server.should_exit = True
        thread.join(timeout=30)

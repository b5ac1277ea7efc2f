"""The OpenAI-compatible server: responses, streaming, errors, metrics, and the official
`openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import asyncio
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
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"


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
    # Beyond the native layer's integer types, and too deep for the JSON parser.
    ({"prompt": "hi", "max_tokens": 2 ** 70}, 400, "max_tokens"),
    ({"prompt": "hi", "max_completion_tokens": 2 ** 70, "max_tokens": 3}, 400, "max_completion_tokens"),
    ({"prompt": "hi", "seed": 2 ** 64}, 400, "seed"),
    ({"prompt": "hi", "seed": 2 ** 200}, 400, "seed"),
    ({"prompt": "hi", "self_extend": {"group_size": 2 ** 70, "window": 4}}, 400, "self_extend"),
    ({"prompt": "hi", "self_extend": {"group_size": 2, "window": 2 ** 31}}, 400, "self_extend"),
    ("[" * 100_000, 400, None),
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


def test_integer_errors_name_the_accepted_range(client: Any) -> None:
    error = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2 ** 31}).json()["error"]
    assert "from 1 to 2**31 - 1" in error["message"], error
    error = client.post("/v1/completions", json={"prompt": "hi", "seed": -1}).json()["error"]
    assert "from 0 to 2**64 - 1" in error["message"], error
    # More digits than Python converts (3.11+), or else a max_tokens out of range.
    r = client.post("/v1/completions", content='{"prompt": "hi", "max_tokens": 1' + "0" * 5000 + "}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_null_means_the_default(client: Any, chat_model: se.Model) -> None:
    """As in OpenAI's API, an optional field sent as null is as if not sent."""
    prompt = random_ids(12, chat_model.config.vocab_size, seed=2)
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None,
             "model": None, "max_completion_tokens": None}
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, **nulls})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion"  # not streamed
    assert data["usage"]["completion_tokens"] == len(chat_model.generate(prompt, 3).token_ids)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 4, **nulls})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    assert client.post("/v1/completions", json={"prompt": None}).json()["error"]["param"] == "prompt"


def test_null_self_extend_still_means_plain_attention(chat_model: se.Model) -> None:
    prompt = random_ids(3 * chat_model.config.trained_context, chat_model.config.vocab_size, seed=3)
    app = create_app(chat_model, model_name="tiny", default_self_extend="auto")
    with TestClient(app) as c:
        data = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                               "self_extend": None}).json()
    plain, auto = chat_model.generate(prompt, 6), chat_model.generate(prompt, 6, self_extend="auto")
    assert plain.text != auto.text  # else this test shows nothing
    assert data["choices"][0]["text"] == plain.text


def _assert_cancelled_early(engine: se.AsyncEngine, max_tokens: int) -> None:
    """Waits for `engine` to go idle and checks that its one request was cancelled
    before it generated `max_tokens` tokens, its KV cache freed."""
    deadline = time.monotonic() + 30
    while engine.stats["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats
    assert stats["running"] == 0 and stats["kv_bytes_reserved"] == 0
    assert stats["requests_finished_total"] == 0  # cancelled, not run to the end
    assert stats["generated_tokens_total"] < max_tokens


def _asgi_post(app: Any, path: str, chunks: list[bytes], *,
               disconnect: asyncio.Event | None = None, truncated: bool = False) -> tuple[int, bytes]:
    """POSTs `chunks` (a chunked body: no Content-Length) to the ASGI app directly; once
    they are read, `receive` reports a disconnect when `disconnect` is set (`truncated`:
    the last chunk promises more, so the client leaves mid-body). Returns the status and
    body sent, after checking that the request left no task running."""
    async def call() -> tuple[int, bytes]:
        messages = [{"type": "http.request", "body": c, "more_body": truncated or i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]
        gone = disconnect or asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        assert asyncio.all_tasks() == {asyncio.current_task()}  # none leaked
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    return asyncio.run(call())


def test_a_non_streaming_client_that_disconnects_cancels_its_sequence(chat_model: se.Model) -> None:
    # A prompt whose greedy continuation runs the full 300 tokens (no EOS), so only
    # the disconnect can end it early.
    prompt = next(p for p in (random_ids(8, chat_model.config.vocab_size, seed=s) for s in range(50))
                  if chat_model.generate(p, 300).finish_reason == "length")
    app = create_app(chat_model, model_name="tiny", default_self_extend=None)
    engine = app.state.server.engine
    body = json.dumps({"prompt": prompt, "max_tokens": 300, "temperature": 0}).encode()
    gone = asyncio.Event()
    gone.set()  # the client hangs up as soon as it has sent its request
    _asgi_post(app, "/v1/completions", [body], disconnect=gone)
    _assert_cancelled_early(engine, 300)
    # A client that stays gets its answer, and the watch on it ends with the request.
    short = json.dumps({"prompt": prompt, "max_tokens": 5, "temperature": 0}).encode()
    status, text = _asgi_post(app, "/v1/completions", [short])
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 5


def test_a_client_gone_mid_body_is_not_a_server_error(chat_model: se.Model) -> None:
    app = create_app(chat_model, model_name="tiny")
    gone = asyncio.Event()
    gone.set()
    status, _ = _asgi_post(app, "/v1/completions", [b'{"prompt": "hi", '], disconnect=gone, truncated=True)
    assert status == 499  # starlette's ClientDisconnect was a 500


def test_request_bodies_have_a_size_cap(chat_model: se.Model) -> None:
    app = create_app(chat_model, model_name="tiny", max_body_bytes=200)
    small = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    large = json.dumps({"prompt": "hi " * 100, "max_tokens": 2}).encode()
    with TestClient(app) as c:
        assert c.post("/v1/completions", content=small).status_code == 200
        r = c.post("/v1/completions", content=large)  # with a Content-Length
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "200 bytes" in r.json()["error"]["message"]
        r = c.post("/v1/completions", content=iter([large]))  # chunked: no Content-Length
        assert r.status_code == 413, r.text
    # Counted as the chunks arrive.
    status, text = _asgi_post(app, "/v1/completions", [large[:150], large[150:]])
    assert status == 413 and json.loads(text)["error"]["code"] == "request_too_large"
    assert _asgi_post(app, "/v1/completions", [small[:10], small[10:]])[0] == 200
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(chat_model, max_body_bytes=0)


def test_chat_prompts_are_built_off_the_event_loop(chat_model: se.Model) -> None:
    app = create_app(chat_model, model_name="tiny", default_self_extend=None)
    engine = app.state.server.engine
    native = engine.engine
    on_a_loop: list[bool] = []

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(native, name)

        def chat_prompt(self, messages: Any) -> list[int]:
            try:
                asyncio.get_running_loop()
                on_a_loop.append(True)
            except RuntimeError:
                on_a_loop.append(False)
            return native.chat_prompt(messages)

    engine.engine = Spy()
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert on_a_loop == [False]


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
        _assert_cancelled_early(engine, 300)
    finally:
        server.should_exit = True
        thread.join(timeout=30)

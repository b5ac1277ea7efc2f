"""An OpenAI-compatible HTTP server on the continuous-batching engine.

    selfextend-rs serve --model PATH --host 127.0.0.1 --port 8000

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(streamed as server-sent events with `"stream": true`), `GET /health` and
`GET /metrics` (Prometheus text). Requests may carry one extension field,
`"self_extend"`: `"auto"`, `{"group_size": G, "window": W}` or `null` (plain
attention); without it the server's default applies. As in OpenAI's API, a field
given as `null` takes its default (only `self_extend` gives `null` a meaning of its
own). Errors use OpenAI's JSON shape.

The HTTP handlers only translate: every request runs on one `AsyncEngine`, which
batches concurrent requests, and a client that disconnects cancels its sequence.
Needs the `server` extra: `pip install "selfextend-rs[server]"`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Optional, Union

import selfextend_rs as se

try:
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError('the server needs the "server" extra: pip install "selfextend-rs[server]"') from None

_SelfExtend = Union[se.SelfExtend, str, None]
# OpenAI's limits on `stop`.
_MAX_STOP = 4
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# Bounds on integer fields, within the native layer's types (beyond them a value
# would overflow there, a 500); a seed is a u64.
_MAX_INT32 = 2**31 - 1
_MAX_SEED = 2**64 - 1
_MAX_BODY_BYTES = 64 * 2**20


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, se.OverloadedError):
        return ApiError(429, str(e), type="rate_limit_error", code="overloaded")
    if isinstance(e, se.OutOfMemoryError):
        return ApiError(400, str(e), code="context_length_exceeded", param="max_tokens")
    if isinstance(e, (se.InvalidArgumentError, se.TokenizerError)):
        return ApiError(400, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}", type="server_error")


class _Params:
    """The sampling fields of a request body, checked."""

    def __init__(self, body: dict[str, Any], default_self_extend: _SelfExtend, max_tokens_default: int) -> None:
        def number(name: str, default: Optional[float], lo: float, hi: float) -> Optional[float]:
            value = body.get(name, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ApiError(400, f"`{name}` must be a number in [{lo}, {hi}], got {value!r}", param=name)
            return float(value)

        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(field, max_tokens_default)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= _MAX_INT32:
            raise ApiError(400, f"`{field}` must be an integer from 1 to 2**31 - 1, got {max_tokens!r}",
                           param=field)
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, f"only `n` = 1 is supported, got {n!r}", param="n")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or len(stop) > _MAX_STOP
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {_MAX_STOP}", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED):
            raise ApiError(400, f"`seed` must be an integer from 0 to 2**64 - 1, got {seed!r}", param="seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "`stream` must be true or false", param="stream")
        self.stream = stream
        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", None, 0.0, 1.0)
        self.kwargs: dict[str, Any] = dict(
            temperature=temperature, top_p=top_p if top_p not in (None, 1.0) else None,
            seed=seed, stop=stop, self_extend=_self_extend(body, default_self_extend))
        self.max_tokens = max_tokens


def _self_extend(body: dict[str, Any], default: _SelfExtend) -> _SelfExtend:
    if "self_extend" not in body:
        return default
    value = body["self_extend"]
    if value is None:
        return None
    if value == "auto":
        return "auto"
    if isinstance(value, dict) and set(value) == {"group_size", "window"}:
        g, w = value["group_size"], value["window"]
        if all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= _MAX_INT32 for x in (g, w)):
            return se.SelfExtend(g, w)
    raise ApiError(400, '`self_extend` must be "auto", {"group_size": G, "window": W} with integers '
                        f"from 1 to 2**31 - 1, or null; got {value!r}", param="self_extend")


def _chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"message {i} needs a string `role`", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            parts = [t for t in texts if isinstance(t, str)]
            if len(parts) != len(content):
                raise ApiError(400, f"message {i}: only text content parts are supported", param="messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"message {i} needs string `content`", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(body: dict[str, Any]) -> Union[str, list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "`prompt` must be a non-empty string or list of token ids (one prompt)", param="prompt")


class Server:
    """The server's state: the model, its engine and the defaults."""

    def __init__(self, model: se.Model, *, model_name: str, engine: se.AsyncEngine,
                 default_self_extend: _SelfExtend = "auto", max_body_bytes: int = _MAX_BODY_BYTES) -> None:
        self.model, self.model_name, self.engine = model, model_name, engine
        self.default_self_extend = default_self_extend
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self._rate: tuple[float, int] = (time.monotonic(), 0)
        self._tokens_per_second = 0.0

    async def _read(self, request: Request) -> bytes:
        """The request body, refused with 413 once it exceeds `max_body_bytes`."""
        limit = self.max_body_bytes
        too_large = ApiError(413, f"the request body exceeds this server's limit of {limit} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        # Chunked uploads carry no Content-Length: count as they arrive.
        stream = request.stream()
        try:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            # Gone while sending: no one reads this answer, but it is not a server error.
            raise ApiError(499, "the client disconnected before sending the whole body") from None
        finally:
            await stream.aclose()
        return b"".join(chunks)

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await self._read(request))
        except (ValueError, RecursionError) as e:
            # ValueError: JSONDecodeError, UnicodeDecodeError and integers too long to convert.
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        # OpenAI reads null as "not given"; `self_extend: null` means plain attention.
        body = {k: v for k, v in body.items() if v is not None or k == "self_extend"}
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        return body

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "selfextend-rs"}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        stats = self.engine.stats
        now, total = time.monotonic(), stats["generated_tokens_total"]
        then, before = self._rate
        if now - then >= 1.0:
            self._tokens_per_second = (total - before) / (now - then)
            self._rate = (now, total)
        rows = [
            ("selfextend_queue_length", "gauge", "Requests waiting for admission.", stats["queued"]),
            ("selfextend_running_sequences", "gauge", "Sequences in the running batch.", stats["running"]),
            ("selfextend_kv_cache_bytes", "gauge", "KV-cache bytes reserved by running sequences.",
             stats["kv_bytes_reserved"]),
            ("selfextend_kv_cache_budget_bytes", "gauge", "The engine's KV-cache budget.", stats["kv_budget"]),
            ("selfextend_generated_tokens_per_second", "gauge",
             "Generated tokens per second since the previous scrape (at least 1 s before).",
             round(self._tokens_per_second, 3)),
            ("selfextend_prompt_tokens_total", "counter", "Prompt tokens admitted.", stats["prompt_tokens_total"]),
            ("selfextend_generated_tokens_total", "counter", "Tokens generated.", total),
            ("selfextend_requests_finished_total", "counter", "Requests completed.",
             stats["requests_finished_total"]),
            ("selfextend_engine_steps_total", "counter", "Batched forward steps.", stats["steps_total"]),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        params = _Params(body, self.default_self_extend, 16)
        stream = self._start(_prompt(body), params)
        return await self._respond(request, stream, params, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        params = _Params(body, self.default_self_extend, 512)
        messages = _chat_messages(body)
        try:
            # Rendering and tokenizing a long conversation takes a while: not on the event loop.
            prompt = await asyncio.to_thread(self.engine.engine.chat_prompt, messages)
        except se.SelfExtendError as e:
            raise _engine_error(e) from None
        stream = self._start(prompt, params)
        return await self._respond(request, stream, params, chat=True)

    def _start(self, prompt: Union[str, list[int]], params: _Params) -> se.AsyncTextStream:
        try:
            return self.engine.astream(prompt, params.max_tokens, **params.kwargs)
        except se.SelfExtendError as e:
            raise _engine_error(e) from None

    async def _respond(self, request: Request, stream: se.AsyncTextStream, params: _Params, *,
                       chat: bool) -> Response:
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not params.stream:
            try:
                text = await _collect(stream, request)
            except se.SelfExtendError as e:
                raise _engine_error(e) from None
            if text is None:
                # 499 (nginx's "client closed request"): nobody is left to read it.
                return Response(status_code=499)
            c = stream.completion
            assert c is not None
            choice: dict[str, Any] = {"index": 0, "finish_reason": _FINISH[c.finish_reason], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
                     "total_tokens": c.prompt_tokens + len(c.token_ids)}
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": self.model_name,
                                 "choices": [choice], "usage": usage})

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any], **extra: Any) -> str:
            body = {"id": rid, "object": chunk_kind, "created": created, "model": self.model_name,
                    "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        def piece_choice(text: str, finish: Optional[str] = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish,
                        "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield event({"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None})
                async for piece in stream:
                    yield event(piece_choice(piece))
                c = stream.completion
                assert c is not None
                usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
                         "total_tokens": c.prompt_tokens + len(c.token_ids)}
                yield event(piece_choice("", _FINISH[c.finish_reason]), usage=usage)
            except se.SelfExtendError as e:
                err = _engine_error(e)
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
            finally:
                await stream.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


async def _collect(stream: se.AsyncTextStream, request: Request) -> Optional[str]:
    """The whole text of `stream`, or None if the client disconnected first, which
    cancels the generation. (A streaming response watches for that itself.)"""
    async def text() -> str:
        return "".join([piece async for piece in stream])

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.create_task(text()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # First, as it cannot be interrupted: a no-op once the text is complete.
        await stream.aclose()
        collecting.cancel()
        watching.cancel()
        await asyncio.gather(collecting, watching, return_exceptions=True)
    if collecting.cancelled():
        return None
    return collecting.result()


def create_app(model: se.Model, *, model_name: Optional[str] = None, default_self_extend: _SelfExtend = "auto",
               max_body_bytes: int = _MAX_BODY_BYTES, **engine_options: Any) -> Starlette:
    """The ASGI app serving `model`.

    Args:
        model: The Model to serve.
        model_name: The id clients pass as `model` (default: the file or directory name).
        default_self_extend: The setting for requests without a `self_extend` field:
            "auto", a SelfExtend, or None for plain attention.
        max_body_bytes: The largest request body accepted; larger ones get HTTP 413
            (default 64 MiB).
        **engine_options: AsyncEngine options (max_batch, prefill_tokens_per_step,
            kv_budget, max_queue).
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    server = Server(model, model_name=model_name or model.path.name, engine=se.AsyncEngine(model, **engine_options),
                    default_self_extend=default_self_extend, max_body_bytes=max_body_bytes)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return e.response()
        return endpoint

    routes = [
        Route("/v1/models", guarded(server.models), methods=["GET"]),
        Route("/v1/completions", guarded(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(server.chat_completions), methods=["POST"]),
        Route("/health", guarded(server.health), methods=["GET"]),
        Route("/metrics", guarded(server.metrics), methods=["GET"]),
    ]
    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "no such endpoint" if status == 404 else f"method {request.method} is not allowed here"
        return ApiError(status, f"{what}: {request.method} {request.url.path}", code="not_found"
                        if status == 404 else "method_not_allowed",
                        headers=getattr(exc, "headers", None)).response()  # 405's Allow

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.server = server
    return app

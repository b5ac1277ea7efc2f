"""asyncio on the continuous-batching engine: `AsyncEngine`, behind `Model.agenerate`,
`Model.astream`, `Model.achat` and `Model.achat_stream`, and the server.

One pump thread per engine waits for the events of all its requests (with the GIL
released, in `Engine.next_events`) and hands each to the asyncio queue of its request,
on that request's event loop. Cancelling a task, or closing a stream early, cancels the
request in the engine, which frees its KV cache at its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any, Optional, Union

from selfextend_rs._native import Completion, Engine, Model

_Prompt = Union[str, Sequence[int]]
_Event = tuple[str, Any]
# How long the pump waits per call before checking whether it should stop.
_PUMP_WAIT = 0.25


class AsyncTextStream:
    """An async iterator of generated text pieces, from `astream` / `achat_stream`.

    `completion` is set once it is exhausted; `aclose()` (or leaving an `async for`
    early) stops the generation."""

    def __init__(self, engine: AsyncEngine, request_id: int, queue: asyncio.Queue[tuple[str, Any]],
                 request: Any) -> None:
        self._engine = engine
        self._id = request_id
        self._queue = queue
        self._request = request
        self._finished = False
        self.completion: Optional[Completion] = None

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        while not self._finished:
            try:
                kind, payload = await self._queue.get()
            except BaseException:
                await self.aclose()
                raise
            if kind == "text":
                return str(payload)
            self._close()
            if kind == "done":
                self.completion = payload
                break
            raise payload
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stops the generation (if still running) and frees its memory."""
        if not self._finished:
            self._request.cancel()
            self._close()

    def _close(self) -> None:
        self._finished = True
        self._engine._forget(self._id)

    def __del__(self) -> None:
        if not self._finished:
            self._request.cancel()
            self._engine._forget(self._id)


class AsyncEngine:
    """A continuous-batching engine for asyncio code over one model.

    Concurrent `agenerate` / `astream` calls (from any number of tasks, on any event
    loop) share each decoding step; a long prompt is prefilled in slices between them.
    `Model.agenerate` and its siblings use one such engine per model, with the default
    options; create your own for other options:

    >>> engine = AsyncEngine(model, max_batch=16)                    # doctest: +SKIP
    >>> completion = await engine.agenerate("Once upon a time", 32)  # doctest: +SKIP

    Args:
        model: The Model to serve.
        **options: `Engine` options: max_batch, prefill_tokens_per_step, kv_budget,
            max_queue.
    """

    def __init__(self, model: Model, **options: Any) -> None:
        # The native engine holds the model's weights, not the Python object: no cycle
        # through Model's own reference to its engine.
        self.engine = Engine(model, **options)
        self._ids = itertools.count()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._pump: Optional[threading.Thread] = None

    @property
    def stats(self) -> dict[str, int]:
        """The engine's counters (queue, running sequences, KV bytes, token totals)."""
        return self.engine.stats

    async def agenerate(self, prompt: _Prompt, max_new_tokens: int = 128, **kwargs: Any) -> Completion:
        """Like `Model.generate` (without `progress`), as a coroutine."""
        stream = self.astream(prompt, max_new_tokens, **kwargs)
        async for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def astream(self, prompt: _Prompt, max_new_tokens: int = 128, **kwargs: Any) -> AsyncTextStream:
        """Like `Model.stream` (without `progress`): `async for piece in ...`. Must be
        called from a running event loop; argument errors, an oversized request
        (OutOfMemoryError) and a full queue (OverloadedError) raise here."""
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        with self._lock:
            self._queues[request_id] = (loop, queue)
        try:
            request = self.engine.submit(request_id, prompt, max_new_tokens, **kwargs)
        except BaseException:
            self._forget(request_id)
            raise
        self._ensure_pump()
        return AsyncTextStream(self, request_id, queue, request)

    async def achat(self, messages: list[dict[str, str]], max_new_tokens: int = 128,
                    **kwargs: Any) -> Completion:
        """Like `Model.chat`, as a coroutine."""
        return await self.agenerate(self.engine.chat_prompt(messages), max_new_tokens, **kwargs)

    def achat_stream(self, messages: list[dict[str, str]], max_new_tokens: int = 128,
                     **kwargs: Any) -> AsyncTextStream:
        """Like `Model.chat_stream`: `async for piece in ...`."""
        return self.astream(self.engine.chat_prompt(messages), max_new_tokens, **kwargs)

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def _ensure_pump(self) -> None:
        with self._lock:
            if self._pump is None or not self._pump.is_alive():
                self._pump = threading.Thread(target=self._run_pump, name="selfextend-pump", daemon=True)
                self._pump.start()

    def _run_pump(self) -> None:
        while True:
            events = self.engine.next_events(_PUMP_WAIT)
            with self._lock:
                if not events and not self._queues:
                    # Idle: stop; the next request starts a new pump.
                    self._pump = None
                    return
                targets = [(self._queues.get(i), kind, payload) for i, kind, payload in events]
            # One wake-up per event loop for the whole batch (a step's tokens for every
            # stream), not one per event.
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Event], _Event]]] = {}
            for target, kind, payload in targets:
                if target is None:
                    continue  # the request was closed; its remaining events are moot
                loop, queue = target
                by_loop.setdefault(loop, []).append((queue, (kind, payload)))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:
                    pass  # its event loop has closed


def _deliver(items: list[tuple[asyncio.Queue[_Event], _Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)

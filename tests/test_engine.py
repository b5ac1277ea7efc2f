"""The continuous-batching engine from Python: Model.agenerate / astream / achat,
AsyncEngine and the low-level Engine; results equal the one-sequence API, concurrent
requests share steps, and cancellation, admission and errors behave."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import random_ids

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def requests(vocab: int) -> list[tuple[list[int], dict]]:
    return [
        (random_ids(5, vocab, seed=1), dict(max_new_tokens=12)),
        (random_ids(70, vocab, seed=2), dict(max_new_tokens=9, self_extend=se.SelfExtend(3, 5))),
        (random_ids(33, vocab, seed=3), dict(max_new_tokens=15, temperature=0.8, seed=7,
                                             self_extend="auto")),
        (random_ids(20, vocab, seed=4), dict(max_new_tokens=6, rope_scaling=se.RopeScaling.linear(2.0))),
    ]


def test_concurrent_agenerate_equals_generate(model_path: Path) -> None:
    model = se.Model.load(model_path)

    async def main() -> list[se.Completion]:
        reqs = requests(model.config.vocab_size)
        return await asyncio.gather(*(model.agenerate(p, **kw) for p, kw in reqs))

    got = asyncio.run(main())
    for (prompt, kwargs), completion in zip(requests(model.config.vocab_size), got):
        alone = model.generate(prompt, **kwargs)
        assert completion.token_ids == alone.token_ids
        assert completion.text == alone.text and completion.finish_reason == alone.finish_reason


def test_astream_pieces_make_the_completion(model_path: Path) -> None:
    model = se.Model.load(model_path)
    prompt = random_ids(30, model.config.vocab_size, seed=5)

    async def main() -> tuple[list[str], se.AsyncTextStream]:
        stream = model.astream(prompt, 20, stop=["zz"])
        return [piece async for piece in stream], stream

    pieces, stream = asyncio.run(main())
    assert stream.completion is not None
    assert "".join(pieces) == stream.completion.text == model.generate(prompt, 20, stop=["zz"]).text


def test_streams_share_steps_and_cancel_frees_the_cache(model_path: Path) -> None:
    model = se.Model.load(model_path)
    engine = se.AsyncEngine(model, max_batch=4, prefill_tokens_per_step=16)
    vocab = model.config.vocab_size

    async def main() -> None:
        # Leave one stream early: its sequence is cancelled and its cache freed.
        stream = engine.astream(random_ids(10, vocab, seed=6), 500)
        others = [engine.agenerate(random_ids(40, vocab, seed=7 + i), 30) for i in range(3)]
        done = asyncio.gather(*others)
        async for _ in stream:
            break
        await stream.aclose()
        await done

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while engine.stats["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = engine.stats
    assert stats["running"] == 0 and stats["kv_bytes_reserved"] == 0
    assert stats["requests_finished_total"] == 3
    # The three 40-token prompts (3 prefill steps and up to 30 decode steps each) ran
    # side by side: one at a time would take about 99 steps.
    assert stats["steps_total"] < 66


def test_errors_are_raised_where_the_request_is_made(model_path: Path) -> None:
    model = se.Model.load(model_path)
    engine = se.AsyncEngine(model, kv_budget=256 * 100, max_batch=1, max_queue=0)

    async def main() -> None:
        with pytest.raises(se.InvalidArgumentError, match="temperature"):
            await engine.agenerate([5, 6], 4, temperature=-1.0)
        with pytest.raises(se.InvalidArgumentError, match="out of range"):
            engine.astream([10**6], 4)
        with pytest.raises(se.OutOfMemoryError, match="tokens fit"):
            engine.astream(random_ids(200, model.config.vocab_size), 4)
        with pytest.raises(se.OverloadedError, match="max_queue"):
            engine.astream([5, 6, 7], 4)

    asyncio.run(main())
    with pytest.raises(RuntimeError):
        engine.astream([5, 6], 4)  # no running event loop
    with pytest.raises(se.InvalidArgumentError, match="max_batch"):
        se.Engine(model, max_batch=0)


def test_achat_uses_the_chat_template(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat"
    shutil.copytree(model_path, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    model = se.Model.load(path)
    messages = [{"role": "user", "content": "The passkey is 4817."}]

    async def main() -> tuple[se.Completion, str]:
        completion = await model.achat(messages, 8)
        pieces = [p async for p in model.achat_stream(messages, 8)]
        return completion, "".join(pieces)

    completion, streamed = asyncio.run(main())
    expected = model.chat(messages, 8)
    assert completion.token_ids == expected.token_ids and streamed == expected.text


def test_low_level_engine_events(model_path: Path) -> None:
    model = se.Model.load(model_path)
    engine = se.Engine(model, max_batch=2)
    assert engine.options["max_batch"] == 2
    prompt = random_ids(12, model.config.vocab_size, seed=9)
    request = engine.submit(7, prompt, 5)
    kinds, text, completion = [], "", None
    deadline = time.monotonic() + 30
    while completion is None and time.monotonic() < deadline:
        for request_id, kind, payload in engine.next_events(0.1):
            assert request_id == 7
            kinds.append(kind)
            if kind == "text":
                text += payload
            elif kind == "done":
                completion = payload
    assert completion is not None and kinds[-1] == "done"
    assert completion.token_ids == model.generate(prompt, 5).token_ids and text == completion.text
    request.cancel()  # after the end: no effect
    assert engine.next_events(0) == []
    # A timeout past what a Duration holds (it panicked) waits, in slices that let
    # Ctrl-C in, until the first event.
    held = engine.submit(8, prompt, 1)  # (dropped, it would cancel the request)
    events = engine.next_events(1e20)
    assert events and events[0][0] == 8
    held.cancel()

"""The GIL is released during work, models are safe to share between threads, and
Ctrl-C interrupts long calls."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import random_ids

import selfextend_rs as se


pytestmark = pytest.mark.usefixtures("quiet_context")


def _timed(fn) -> tuple[float, float]:
    start = time.monotonic()
    fn()
    return start, time.monotonic()


def test_calls_overlap_in_time(model: se.Model) -> None:
    """Two threads inside `logits` at once: only possible with the GIL released."""
    ids = random_ids(600, model.config.vocab_size, seed=1)
    windows: list[tuple[float, float]] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        barrier.wait()
        windows.append(_timed(lambda: model.logits(ids, chunk_size=64)))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = windows
    assert max(a0, b0) < min(a1, b1), "the two calls never ran at the same time"


def test_python_runs_while_a_call_is_busy(model: se.Model) -> None:
    ids = random_ids(800, model.config.vocab_size, seed=2)
    ticks = 0
    done = threading.Event()

    def worker() -> None:
        model.logits(ids, chunk_size=50)
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    assert ticks > 5


def test_shared_and_separate_models_are_deterministic(model_path, model: se.Model) -> None:
    other = se.Model.load(model_path)
    prompts = [random_ids(30 + 7 * i, model.config.vocab_size, seed=i) for i in range(6)]
    kwargs = dict(temperature=0.9, seed=3, self_extend=se.SelfExtend(2, 8))
    expected = [model.generate(p, 16, **kwargs).token_ids for p in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            m = model if i % 2 else other
            if i % 3 == 0:
                stream = m.stream(prompts[i], 16, **kwargs)
                list(stream)
                results[i] = stream.completion.token_ids
            else:
                results[i] = m.generate(prompts[i], 16, **kwargs).token_ids
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(prompts))] == expected


def test_one_stream_from_two_threads(model: se.Model) -> None:
    stream = model.stream(random_ids(20, model.config.vocab_size, seed=4), 60)
    pieces: list[str] = []
    lock = threading.Lock()

    def drain() -> None:
        for piece in stream:
            with lock:
                pieces.append(piece)

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stream.completion is not None
    assert len("".join(pieces)) == len(stream.completion.text)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
def test_ctrl_c_interrupts_a_long_prefill(model: se.Model) -> None:
    ids = random_ids(6000, model.config.vocab_size, seed=5)
    # Shells that start jobs in the background ignore SIGINT; restore Python's handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        model.logits(ids, chunk_size=32)
    elapsed = time.monotonic() - start
    timer.join()
    signal.signal(signal.SIGINT, previous)
    full_time = _timed(lambda: model.logits(ids[:600], chunk_size=32))
    # Interrupted long before the 6000-token call could have finished, and still works.
    assert elapsed < 10 * (full_time[1] - full_time[0]) + 2
    assert model.generate(ids[:20], 3).prompt_tokens == 20

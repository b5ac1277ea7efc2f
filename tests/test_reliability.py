"""Reliability under load: many threads, early-closed streams, Ctrl-C latency, memory
budgets, and models loaded and dropped in a loop."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_ids

import selfextend_rs as se
from gguf_files import write_gguf

pytestmark = pytest.mark.usefixtures("quiet_context")


def test_many_threads_on_shared_and_separate_models(model_path: Path, model: se.Model) -> None:
    models = [model, se.Model.load(model_path), se.Model.load(model_path)]
    vocab = model.config.vocab_size
    prompts = [random_ids(20 + 9 * i, vocab, seed=100 + i) for i in range(8)]
    kwargs = dict(temperature=0.8, top_p=0.9, seed=7, self_extend=se.SelfExtend(3, 10))
    gen_expected = [model.generate(p, 12, **kwargs).token_ids for p in prompts]
    logits_expected = [model.logits(p, self_extend=se.SelfExtend(2, 6)) for p in prompts]
    failures: list[str] = []
    bad_calls = 0
    lock = threading.Lock()

    def work(worker: int) -> None:
        nonlocal bad_calls
        for round_ in range(3):
            i = (worker + round_) % len(prompts)
            m = models[(worker + round_) % len(models)]
            try:
                kind = (worker + round_) % 4
                if kind == 0:
                    got = m.generate(prompts[i], 12, **kwargs).token_ids
                    ok = got == gen_expected[i]
                elif kind == 1:
                    stream = m.stream(prompts[i], 12, **kwargs)
                    "".join(stream)
                    ok = stream.completion is not None and stream.completion.token_ids == gen_expected[i]
                elif kind == 2:
                    got_l = m.logits(prompts[i], self_extend=se.SelfExtend(2, 6))
                    ok = np.array_equal(got_l, logits_expected[i])
                else:
                    try:
                        m.generate([vocab + worker], 2)
                        ok = False
                    except se.InvalidArgumentError:
                        with lock:
                            bad_calls += 1
                        ok = True
                if not ok:
                    with lock:
                        failures.append(f"worker {worker} round {round_} kind {kind}")
            except BaseException as e:  # noqa: BLE001
                with lock:
                    failures.append(f"worker {worker}: {e!r}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not failures, failures
    assert bad_calls == 9


def test_closing_or_dropping_a_stream_stops_it(model: se.Model) -> None:
    prompt = random_ids(30, model.config.vocab_size, seed=11)
    expected = model.generate(prompt, 10, seed=1, temperature=0.7).token_ids
    # A stream does its work in __next__: once closed or dropped, nothing runs.
    stream = model.stream(prompt, 100_000)
    next(stream, None)
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 1.0
    with pytest.raises(StopIteration):
        next(stream)
    dropped = model.stream(prompt, 100_000)
    next(dropped, None)
    del dropped
    gc.collect()
    assert model.generate(prompt, 10, seed=1, temperature=0.7).token_ids == expected


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
def test_ctrl_c_returns_within_a_second_and_the_model_still_works(model: se.Model) -> None:
    ids = random_ids(16_000, model.config.vocab_size, seed=12)
    expected = model.logits(ids[:40])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.5, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            # Long chunks deep into the context: the slowest place for a check.
            model.logits(ids, chunk_size=2048)
        latency = time.monotonic() - sent[0]
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert latency < 1.0, f"Ctrl-C took {latency:.2f} s to land"
    np.testing.assert_array_equal(model.logits(ids[:40]), expected)


def test_a_prompt_far_beyond_memory_is_refused_before_allocating(model: se.Model) -> None:
    # 50M tokens of logits alone would need hundreds of GiB.
    ids = np.zeros(50_000_000, dtype=np.uint32)
    with pytest.raises(se.OutOfMemoryError, match="tokens would fit"):
        model.logits(ids)
    assert model.generate(ids[:5].tolist(), 2).prompt_tokens == 5


def test_max_memory_caps_a_request(model_path: Path) -> None:
    capped = se.Model.load(model_path, max_memory=4_000_000)
    assert capped.max_memory == 4_000_000
    ids = random_ids(50, capped.config.vocab_size, seed=13)
    assert capped.generate(ids, 4).prompt_tokens == 50
    with pytest.raises(se.OutOfMemoryError, match="max_memory allows"):
        capped.generate(ids, 100_000)
    with pytest.raises(se.OutOfMemoryError, match="tokens would fit"):
        capped.logits(random_ids(20_000, capped.config.vocab_size, seed=14))


def test_scoring_counts_a_chunk_of_logits_against_the_cap(model_path: Path,
                                                           quiet_context: None) -> None:
    # token_logprobs keeps no logits across chunks, but one chunk's logits and their
    # log-softmax (3 x 4 bytes x vocab per row, about 19 MB for 5000 rows here) do
    # exist at once, so a cap that small chunks fit under must refuse a huge chunk.
    capped = se.Model.load(model_path, max_memory=25_000_000)
    ids = random_ids(5000, capped.config.vocab_size, seed=15)
    assert len(capped.token_logprobs(ids, chunk_size=256)) == 4999
    with pytest.raises(se.OutOfMemoryError, match="smaller chunk_size"):
        capped.token_logprobs(ids, chunk_size=5000)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _mapped_or_open(path: Path) -> bool:
    target = str(path.resolve())
    if target in Path("/proc/self/maps").read_text():
        return True
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fds / fd) == target for fd in os.listdir(fds))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_loading_and_dropping_models_does_not_leak(model_path: Path, tmp_path: Path) -> None:
    gguf = write_gguf(model_path, tmp_path / "tiny.gguf", quant="Q8_0")
    safetensors = model_path / "model.safetensors"
    ids = random_ids(12, 300, seed=15)

    def cycle() -> None:
        for path in (model_path, gguf):
            m = se.Model.load(path)
            m.generate(ids, 2)
            del m

    for _ in range(5):  # warm up allocator pools and lazily built tables
        cycle()
    gc.collect()
    before = _rss_bytes()
    for _ in range(25):
        cycle()
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 32 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 50 loads"
    assert not _mapped_or_open(safetensors), "the safetensors file is still mapped or open"
    assert not _mapped_or_open(gguf), "the GGUF file is still mapped or open"


def test_close_while_another_thread_iterates(model: se.Model) -> None:
    # __next__ holds the stream's lock and re-takes the GIL between steps; close()
    # and completion must wait for that lock without holding the GIL.
    stream = model.stream(random_ids(25, model.config.vocab_size, seed=16), 5000)
    started = threading.Event()

    def drain() -> None:
        for _ in stream:
            started.set()

    worker = threading.Thread(target=drain)
    worker.start()
    started.wait(5)
    for _ in range(50):
        assert stream.completion is None or stream.completion.token_ids
        stream.close()
    worker.join(timeout=60)
    assert not worker.is_alive(), "close() deadlocked with a running __next__"

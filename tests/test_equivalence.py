"""Full prefill, chunked prefill and token-by-token decode agree, and so do the
attention backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_ids
from reference import Reference

import selfextend_rs as se


pytestmark = pytest.mark.usefixtures("quiet_context")


@pytest.mark.parametrize("setting", [None, (2, 8), (3, 5), (7, 10)], ids=str)
def test_chunk_sizes_agree(model: se.Model, setting) -> None:
    ids = random_ids(97, model.config.vocab_size, seed=5)
    self_extend = se.SelfExtend(*setting) if setting else None
    full = model.logits(ids, self_extend=self_extend, chunk_size=len(ids))
    for chunk in [1, 2, 5, 8, 9, 31, 96]:
        chunked = model.logits(ids, self_extend=self_extend, chunk_size=chunk)
        np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("setting", [None, (3, 5)], ids=str)
def test_decode_matches_full_prefill(model: se.Model, setting) -> None:
    """Greedy decode through the KV cache reproduces argmax of one-shot logits."""
    self_extend = se.SelfExtend(*setting) if setting else None
    prompt = random_ids(40, model.config.vocab_size, seed=6)
    out = model.generate(prompt, 30, self_extend=self_extend)
    seq = prompt + out.token_ids
    full = model.logits(seq, self_extend=self_extend, chunk_size=len(seq))
    argmax = full[len(prompt) - 1 : len(seq) - 1].argmax(-1).tolist()
    assert argmax == out.token_ids


def test_stream_equals_generate(model: se.Model) -> None:
    prompt = random_ids(50, model.config.vocab_size, seed=7)
    kwargs = dict(self_extend=se.SelfExtend(2, 8), temperature=0.8, top_k=40, top_p=0.9, seed=11)
    full = model.generate(prompt, 40, **kwargs)
    stream = model.stream(prompt, 40, **kwargs)
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert all(pieces)
    done = stream.completion
    assert done is not None and done.token_ids == full.token_ids


@pytest.mark.parametrize("attention", ["naive", "tiled", "fused"])
def test_attention_backends_agree_with_numpy(model_path: Path, reference: Reference,
                                             attention: str) -> None:
    model = se.Model.load(model_path, attention=attention)
    assert model.attention == attention
    ids = random_ids(100, model.config.vocab_size, seed=8)
    for setting, se_ref in [(None, None), (se.SelfExtend(3, 10), (3, 10))]:
        for chunk in [None, 13]:
            got = model.logits(ids, self_extend=setting, chunk_size=chunk)
            np.testing.assert_allclose(got, reference.logits(ids, se_ref), rtol=1e-4, atol=1e-4)


def test_attention_default_and_errors(model_path: Path) -> None:
    assert se.Model.load(model_path).attention == "fused"
    with pytest.raises(se.InvalidArgumentError, match="unknown attention backend 'flash'"):
        se.Model.load(model_path, attention="flash")  # type: ignore[arg-type]

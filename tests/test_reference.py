"""Model.logits and greedy generate against the independent numpy forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from conftest import random_ids
from reference import Reference

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")

SETTINGS: list[Optional[tuple[int, int]]] = [None, (2, 8), (3, 5), (4, 6), (5, 3), (1, 4)]


def assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    """Within `rtol` relative to the largest reference logit."""
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < rtol, f"max relative error {err:.2e}"


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_logits_match_reference(checkpoints: dict[str, Path], ckpt_name: str, setting) -> None:
    path = checkpoints[ckpt_name]
    model, ref = se.Model.load(path), Reference(path)
    trained = model.config.trained_context
    n = 4 * trained + 7  # several times the trained context
    ids = random_ids(n, model.config.vocab_size, seed=n)
    self_extend = se.SelfExtend(*setting) if setting else None
    ours = model.logits(ids, self_extend=self_extend, chunk_size=37)
    assert ours.dtype == np.float32 and ours.shape == (n, model.config.vocab_size)
    assert_close(ours, ref.logits(ids, setting))


def test_self_extend_is_not_vanilla_past_the_window(model: se.Model, reference: Reference) -> None:
    # Guards the test above: the settings must actually change the output.
    ids = random_ids(90, model.config.vocab_size, seed=1)
    vanilla = reference.logits(ids)
    extended = reference.logits(ids, (4, 6))
    assert np.abs(vanilla[6:] - extended[6:]).max() / np.abs(vanilla).max() > 0.05
    np.testing.assert_array_equal(vanilla[:6], extended[:6])


def test_window_covering_the_sequence_equals_vanilla(model: se.Model) -> None:
    ids = random_ids(30, model.config.vocab_size, seed=2)
    vanilla = model.logits(ids)
    np.testing.assert_array_equal(model.logits(ids, self_extend=se.SelfExtend(4, 30)), vanilla)
    np.testing.assert_array_equal(model.logits(ids, self_extend=se.SelfExtend(8, 1000)), vanilla)


@pytest.mark.parametrize("setting", [None, (3, 5)], ids=str)
def test_greedy_generate_is_the_reference_argmax_chain(model: se.Model, reference: Reference, setting) -> None:
    prompt = random_ids(70, model.config.vocab_size, seed=3)
    self_extend = se.SelfExtend(*setting) if setting else None
    out = model.generate(prompt, 24, self_extend=self_extend, chunk_size=16)
    expected = reference.greedy(prompt, 24, setting)
    assert out.token_ids == expected
    assert out.finish_reason == ("length" if len(expected) == 24 else "eos")


def test_dtypes_stay_close(model_path: Path, reference: Reference) -> None:
    ids = random_ids(40, 300, seed=4)
    ref = reference.logits(ids, (2, 8))
    for dtype, rtol in [("f32", 1e-4), ("bf16", 6e-2), ("f16", 1e-2)]:
        m = se.Model.load(model_path, dtype=dtype)
        assert m.dtype == dtype
        assert_close(m.logits(ids, self_extend=se.SelfExtend(2, 8)), ref, rtol)

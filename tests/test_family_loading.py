"""Loading the model families, beyond the numerics of test_families.py: multimodal
Gemma 3 checkpoints, what ModelConfig and `selfextend-rs info` report, and the errors
for families, fields and formats the engine does not implement."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import assert_chunking_barely_matters, random_ids
from safetensors.numpy import load_file, save_file
from tiny_models import write_checkpoint

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("gemma3") / "text", "gemma3", seed=7)


def _multimodal(text: Path, out: Path, rename: Callable[[str], str], style: str) -> Path:
    """`text` re-saved as Gemma3ForConditionalGeneration saves it: the text config under
    `text_config`, the text weights renamed, and a vision tensor beside them."""
    out.mkdir()
    shutil.copy(text / "tokenizer.json", out / "tokenizer.json")
    text_cfg: dict[str, Any] = json.loads((text / "config.json").read_text())
    outer = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "eos_token_id": text_cfg.pop("eos_token_id"),
        "bos_token_id": text_cfg.pop("bos_token_id"),
        # Released configs leave out what the text config class defaults.
        "text_config": {k: v for k, v in text_cfg.items() if k not in ("architectures",)},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "transformers_version": "5.24.0" if style == "v5" else "4.57.6",
    }
    (out / "config.json").write_text(json.dumps(outer, indent=2))
    weights = {rename(k): v for k, v in load_file(str(text / "model.safetensors")).items()}
    weights["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.ones((8, 3), np.float32)
    save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("style", ["v4", "v5"])
def test_multimodal_gemma3_loads_its_text_model(gemma3: Path, tmp_path: Path, style: str) -> None:
    if style == "v4":
        def rename(k: str) -> str:
            return "language_model." + k
    else:
        def rename(k: str) -> str:
            return k.replace("model.", "model.language_model.", 1)
    wrapped = se.Model.load(_multimodal(gemma3, tmp_path / "mm", rename, style))
    text = se.Model.load(gemma3)
    assert wrapped.config.model_type == "gemma3_text"
    assert wrapped.config.eos_token_ids == text.config.eos_token_ids
    ids = random_ids(50, text.config.vocab_size, seed=3)
    ext = se.SelfExtend(3, 6)
    np.testing.assert_array_equal(wrapped.logits(ids, self_extend=ext), text.logits(ids, self_extend=ext))


def test_model_config_reports_the_family_and_its_layers(gemma3: Path, checkpoints: dict[str, Path]) -> None:
    c = se.Model.load(gemma3).config
    assert c.model_type == "gemma3_text"
    assert c.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert c.sliding_window == 8
    assert c.self_extend_layers == [1, 3]
    assert c.rope_theta == 1000.0  # the global layers' base, which SelfExtend applies to
    assert c.rope_scaling is not None and c.rope_scaling.kind == "linear"
    llama = se.Model.load(checkpoints["gqa"]).config
    assert llama.model_type == "llama" and llama.sliding_window is None
    assert llama.layer_types == ["full_attention"] * llama.num_layers
    assert llama.self_extend_layers == list(range(llama.num_layers))


def test_info_prints_the_attention_split(gemma3: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "selfextend_rs.cli", "info", "--model", str(gemma3)],
                         capture_output=True, text=True, check=True).stdout
    assert "gemma3_text" in out
    assert "sliding window 8 on layers 0, 2; SelfExtend on layers 1, 3" in out


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_family_names_the_supported_ones(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _edited(checkpoints["gqa"], tmp_path / "m", lambda c: c.update(model_type="falcon"))
    with pytest.raises(se.UnsupportedModelError) as err:
        se.Model.load(path)
    for family in ["'llama'", "'mistral'", "'qwen2'", "'qwen3'", "'gemma2'", "'gemma3_text'", "'phi3'"]:
        assert family in str(err.value)


@pytest.mark.parametrize("edit, named", [
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}),
     "rope_scaling.beta_fast"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0,
                                         "mscale": 0.7}), "rope_parameters.mscale"),
    (lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}), "quantization_config"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(layer_types=["chunked_attention"] * 2), "chunked_attention"),
])
def test_fields_that_change_the_arithmetic_are_refused_by_name(
        tmp_path: Path, edit: Callable[[dict[str, Any]], None], named: str) -> None:
    src = write_checkpoint(tmp_path / "q", "qwen3", seed=1)
    with pytest.raises(se.UnsupportedModelError, match=named.replace(".", r"\.")):
        se.Model.load(_edited(src, tmp_path / "edited", edit))


def test_transformers_5_rope_parameters_are_not_ignored(tmp_path: Path) -> None:
    # The silent failure this guards against: a transformers 5 config whose RoPE base and
    # llama3 scaling live in `rope_parameters` loading as plain RoPE at base 10000.
    v5 = se.Model.load(write_checkpoint(tmp_path / "v5", "llama31", seed=2, style="v5"))
    assert v5.config.rope_scaling is not None and v5.config.rope_scaling.kind == "llama3"
    plain = _edited(tmp_path / "v5", tmp_path / "plain", lambda c: c.pop("rope_parameters"))
    ids = random_ids(60, v5.config.vocab_size, seed=4)
    assert np.abs(v5.logits(ids) - se.Model.load(plain).logits(ids)).max() > 1e-2


def test_gemma_embedding_models_are_refused(gemma3: Path, tmp_path: Path) -> None:
    path = _edited(gemma3, tmp_path / "emb", lambda c: c.update(use_bidirectional_attention=True))
    with pytest.raises(se.UnsupportedModelError, match="use_bidirectional_attention"):
        se.Model.load(path)


@pytest.mark.parametrize("name", ["qwen2", "phi3", "gemma3"])
def test_quantized_gguf_tracks_its_dense_weights(tmp_path: Path, name: str) -> None:
    # Quantized q/k/v (Qwen2: with biases) are stacked into one matmul, Phi-3's are
    # fused already; every chunk runs the quantized kernel on 8-bit activations.
    from gguf_files import write_gguf
    from tiny_models import GGUF_EXPRESSIBLE

    ckpt = write_checkpoint(tmp_path / "ckpt", name, seed=5, overrides=GGUF_EXPRESSIBLE[name])
    path = write_gguf(ckpt, tmp_path / f"{name}-Q8_0.gguf", quant="Q8_0")
    q, dense = se.Model.load(path), se.Model.load(path, dtype="f32")
    assert q.quantized and not dense.quantized
    ext = se.SelfExtend(2, 4)
    ids = random_ids(60, q.config.vocab_size, seed=6)
    got = q.logits(ids, self_extend=ext)
    assert_chunking_barely_matters(q.logits(ids, self_extend=ext, chunk_size=7), got)
    # 8-bit activations move these sharp tiny models' logits by about 6%; a dropped
    # or misplaced q/k/v bias moves them by 40-50%.
    want = dense.logits(ids, self_extend=ext)
    assert np.abs(got - want).max() / np.abs(want).max() < 0.1
    assert not np.array_equal(got, want)

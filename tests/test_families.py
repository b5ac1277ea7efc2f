"""Model families (tiny_models.FAMILIES: Llama 3.1, Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3, Phi-3) against the independent numpy reference, in both config.json styles
(transformers 4.x and 5.x), chunked and token by token, from safetensors and from GGUF;
and the rule for which layers get SelfExtend: a layer with a sliding window no longer
than the trained context keeps plain windowed attention, every other layer is extended.

The tests named test_reference_* and test_gguf_file_* check the reference, the
checkpoints and the GGUF writer only; they need no engine support for the families.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np
import pytest
from conftest import random_ids
from gguf_files import ARCHS, llama3_rope_factors, tensor_names, write_gguf
from reference import Reference
from tiny_models import FAMILIES, GGUF_EXPRESSIBLE, STYLES, write_checkpoint

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")

NAMES = sorted(FAMILIES)
SEED = {name: 100 + i for i, name in enumerate(NAMES)}
# (G, W): W = 4 and 6 lie inside the sliding windows (8), so SelfExtend on a local layer
# would change it; W = 12 covers them (and is inside Phi-3's and mistral-wide's windows).
SETTINGS: list[Optional[tuple[int, int]]] = [None, (2, 4), (3, 6), (4, 12)]
# Which layers are global (extended) under the rule, and each layer's sliding window.
EXPECTED_LAYERS = {
    "llama31": ([0, 1], [None, None]),
    "qwen2": ([0], [None, 8, 8]),              # max_window_layers=1: layers 1.. slide
    "qwen3": ([0, 1], [None, None]),
    "mistral": ([], [8, 8]),                   # 8 <= 32: every layer local
    "mistral-wide": ([0, 1], [48, 48]),        # 48 > 32: extended, still windowed
    "gemma2": ([1, 3], [8, None, 8, None]),
    "gemma3": ([1, 3], [8, None, 8, None]),
    "phi3": ([0, 1], [96, 96]),                # 96 > 64: extended, still windowed
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@lru_cache(maxsize=None)
def _checkpoint(root: Path, name: str, style: str = "v4", gguf_variant: bool = False) -> Path:
    overrides = GGUF_EXPRESSIBLE[name] if gguf_variant else None
    tag = f"{name}-{style}" + ("-gguf" if gguf_variant else "")
    return write_checkpoint(root / tag, name, SEED[name], style=style, overrides=overrides)


@lru_cache(maxsize=None)
def _reference(path: Path) -> Reference:
    return Reference(path)


@lru_cache(maxsize=None)
def _model(path: Path) -> se.Model:
    return se.Model.load(path)


def length(ref: Reference) -> int:
    return 4 * ref.trained + 7  # several times the trained context


def assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    """Within `rtol` relative to the largest reference logit."""
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < rtol, f"max relative error {err:.2e}"


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def broken_variants(ref: Reference) -> dict[str, Union[str, list[int]]]:
    """Ways to get the layer rule wrong: SelfExtend on every layer (local ones too), on
    no layer, or on exactly the wrong ones."""
    ext = ref.extended_layers()
    return {"every layer": "all", "no layer": [],
            "inverted": [i for i in range(ref.n_layers) if i not in ext]}


# --- the reference, the checkpoints and the GGUF writer (no engine) ----------------------


@pytest.mark.parametrize("name", NAMES)
def test_reference_layers_follow_the_rule(root: Path, name: str) -> None:
    ref = _reference(_checkpoint(root, name))
    extended, windows = EXPECTED_LAYERS[name]
    assert ref.windows == windows
    assert ref.extended_layers() == extended


@pytest.mark.parametrize("name", NAMES)
def test_reference_v4_and_v5_configs_are_the_same_model(root: Path, name: str) -> None:
    v4, v5 = (_reference(_checkpoint(root, name, style)) for style in STYLES)
    assert v4.windows == v5.windows and v4.extended_layers() == v5.extended_layers()
    ids = random_ids(length(v4), v4.cfg["vocab_size"], seed=1)
    for setting in [None, (3, 6)]:
        np.testing.assert_array_equal(v4.logits(ids, setting), v5.logits(ids, setting))


@pytest.mark.parametrize("name", NAMES)
def test_reference_rule_changes_the_output(root: Path, name: str) -> None:
    """Each way to get the rule wrong that is not the rule in disguise changes the logits
    visibly, so the engine test below can tell them apart."""
    ref = _reference(_checkpoint(root, name))
    ids = random_ids(length(ref), ref.cfg["vocab_size"], seed=2)
    vanilla = ref.logits(ids)
    correct = ref.logits(ids, (2, 4))
    if ref.extended_layers():
        assert rel_diff(correct, vanilla) > 0.05
    else:
        np.testing.assert_array_equal(correct, vanilla)
    distinct = 0
    for label, layers in broken_variants(ref).items():
        chosen = set(range(ref.n_layers)) if layers == "all" else set(layers)
        if chosen == set(ref.extended_layers()):
            continue
        diff = rel_diff(ref.logits(ids, (2, 4), se_layers=layers), correct)
        assert diff > 0.02, f"{label}: {diff:.3f}"
        distinct += 1
    assert distinct >= 1


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gemma3", "mistral"])
def test_reference_window_covering_the_local_windows(root: Path, name: str) -> None:
    """With W at least the sliding window, SelfExtend on a local layer is a no-op: the
    rule only shows with W below the window, which SETTINGS include."""
    ref = _reference(_checkpoint(root, name))
    ids = random_ids(length(ref), ref.cfg["vocab_size"], seed=3)
    np.testing.assert_allclose(ref.logits(ids, (4, 12), se_layers="all"), ref.logits(ids, (4, 12)),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_reference_checkpoint_tensor_names(root: Path, name: str) -> None:
    ref = _reference(_checkpoint(root, name))
    w, c = ref.w, ref.cfg
    d = ref.head_dim
    layer = {k.split(".", 3)[3] for k in w if k.startswith("model.layers.0.")}
    base = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
            "mlp.down_proj.weight"}
    split = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight"}
    expected = {
        "llama31": base | split, "mistral": base | split, "mistral-wide": base | split,
        "qwen2": base | split | {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"},
        "qwen3": base | split | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        "gemma2": base | split | {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
        "gemma3": base | split | {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
                                  "self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        "phi3": base | {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"},
    }[name]
    assert layer == expected
    assert ("lm_head.weight" in w) == (name not in ("qwen3", "gemma2", "gemma3"))
    if "self_attn.q_norm.weight" in expected:
        assert w["model.layers.0.self_attn.q_norm.weight"].shape == (d,)
    if name == "phi3":
        n_qkv = (ref.n_heads + 2 * ref.n_kv) * d
        assert w["model.layers.0.self_attn.qkv_proj.weight"].shape == (n_qkv, c["hidden_size"])
        assert w["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * c["intermediate_size"], c["hidden_size"])
    if ref.gemma:  # norms stored around 0 (HF computes 1 + w)
        assert np.abs(w["model.norm.weight"]).max() < 0.25


@lru_cache(maxsize=None)
def _gguf(root: Path, name: str, quant: Optional[str] = None) -> Path:
    path = _checkpoint(root, name, gguf_variant=True)
    return write_gguf(path, root / f"{name}-{quant or 'f32'}.gguf", quant=quant)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of gguf_files.permute (llama.cpp's q/k row order back to HF's)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("name", NAMES)
def test_gguf_file_tensor_names_are_llama_cpps(root: Path, name: str) -> None:
    """Our name table against gguf-py's TensorNameMap, which the converter uses."""
    arch_name = ARCHS[FAMILIES[name]]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    ref = _reference(_checkpoint(root, name))
    mapping = gguf.get_tensor_name_map(arch, ref.n_layers)
    for hf, ours in tensor_names(arch_name, list(ref.w)).items():
        base, suffix = hf.rsplit(".", 1)
        assert f"{mapping.get_name(base)}.{suffix}" == ours, hf


def _read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    # GGUF lists dims fastest first; numpy data comes back in row-major HF order.
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
               for t in reader.tensors}
    return kv, tensors


@pytest.mark.parametrize("name", NAMES)
def test_gguf_file_round_trips_to_the_checkpoint(root: Path, name: str) -> None:
    """Undoing llama.cpp's conventions (q/k permutation for arch llama, Gemma's 1 + w,
    fused Phi-3 tensors kept) gives back every HF tensor; the RoPE tensors give the
    reference's frequencies; the metadata holds what the model needs."""
    path = _checkpoint(root, name, gguf_variant=True)
    ref = _reference(path)
    kv, tensors = _read_gguf(_gguf(root, name))
    arch = kv["general.architecture"]
    assert arch == {"mistral": "llama", "mistral-wide": "llama", "llama31": "llama"}.get(name, name)
    names = tensor_names(arch, list(ref.w))
    assert set(tensors) - set(names.values()) <= {"rope_freqs.weight", "rope_factors_long.weight",
                                                   "rope_factors_short.weight"}
    for hf, g in names.items():
        t = tensors[g]
        if arch == "llama" and ".q_proj." in hf:
            t = unpermute(t, ref.n_heads)
        if arch == "llama" and ".k_proj." in hf:
            t = unpermute(t, ref.n_kv)
        if ref.gemma and hf.endswith("norm.weight"):
            t = t - 1
        np.testing.assert_allclose(t, ref.w[hf], rtol=0, atol=1e-6, err_msg=hf)
    assert kv[f"{arch}.context_length"] == ref.trained
    assert kv[f"{arch}.block_count"] == ref.n_layers
    assert kv[f"{arch}.attention.head_count_kv"] == ref.n_kv
    if name == "llama31":
        n = length(ref)
        freqs = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16) / tensors["rope_freqs.weight"]
        np.testing.assert_allclose(freqs, ref._layer_inv_freq(0, n)[0], rtol=1e-6)
        assert not any(k.startswith("llama.rope.scaling") for k in kv)
        np.testing.assert_array_equal(tensors["rope_freqs.weight"], llama3_rope_factors(ref.cfg))
    if name == "phi3":
        rd = kv["phi3.rope.dimension_count"]
        assert rd == 8 and kv["phi3.attention.sliding_window"] == 96
        assert kv["phi3.rope.scaling.original_context_length"] == 16
        for n, factors in [(16, "rope_factors_short.weight"), (17, "rope_factors_long.weight")]:
            inv, attn = ref._layer_inv_freq(0, n)
            np.testing.assert_allclose(1.0 / 10000.0 ** (np.arange(0, rd, 2) / rd) / tensors[factors], inv, rtol=1e-6)
            assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(attn, rel=1e-6)
    if name.startswith("gemma"):
        assert kv[f"{arch}.attention.sliding_window"] == 8
        assert kv[f"{arch}.attention.key_length"] == ref.head_dim
    if name == "gemma2":
        assert kv["gemma2.attn_logit_softcapping"] == 3.0 and kv["gemma2.final_logit_softcapping"] == 5.0
    if name == "gemma3":
        assert kv["gemma3.rope.freq_base"] == 1000.0 and kv["gemma3.rope.freq_base_swa"] == 10000.0
        assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.scaling.factor"] == 2.0
        assert "gemma3.final_logit_softcapping" not in kv
    if name == "qwen3":
        assert kv["qwen3.attention.key_length"] == 24
    pre = {"qwen2": "qwen2", "llama31": "llama-bpe", "phi3": "gpt-4o"}.get(name, "default")
    assert kv["tokenizer.ggml.pre"] == pre


# --- the engine --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_v4_and_v5_configs_load_alike(root: Path, name: str) -> None:
    v4, v5 = (_model(_checkpoint(root, name, style)) for style in STYLES)
    ref = _reference(_checkpoint(root, name))
    for m in (v4, v5):
        assert m.config.trained_context == ref.trained
        assert m.config.vocab_size == ref.cfg["vocab_size"]
        assert m.config.num_layers == ref.n_layers
        assert m.config.head_dim == ref.head_dim
    ids = random_ids(length(ref), ref.cfg["vocab_size"], seed=4)
    for setting in [None, (2, 4)]:
        ext = se.SelfExtend(*setting) if setting else None
        np.testing.assert_array_equal(v4.logits(ids, self_extend=ext, chunk_size=37),
                                      v5.logits(ids, self_extend=ext, chunk_size=37))


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_reference(root: Path, name: str, setting) -> None:
    path = _checkpoint(root, name)
    model, ref = _model(path), _reference(path)
    n = length(ref)
    ids = random_ids(n, ref.cfg["vocab_size"], seed=n)
    ext = se.SelfExtend(*setting) if setting else None
    ours = model.logits(ids, self_extend=ext, chunk_size=37)
    assert ours.dtype == np.float32 and ours.shape == (n, ref.cfg["vocab_size"])
    assert_close(ours, ref.logits(ids, setting))


@pytest.mark.parametrize("name", NAMES)
def test_engine_applies_the_layer_rule(root: Path, name: str) -> None:
    """The engine matches the reference under the rule and none of the broken rules."""
    path = _checkpoint(root, name)
    model, ref = _model(path), _reference(path)
    ids = random_ids(length(ref), ref.cfg["vocab_size"], seed=5)
    for setting in [(2, 4), (3, 6)]:
        ours = model.logits(ids, self_extend=se.SelfExtend(*setting), chunk_size=37)
        correct = ref.logits(ids, setting)
        assert_close(ours, correct)
        for label, layers in broken_variants(ref).items():
            wrong = ref.logits(ids, setting, se_layers=layers)
            if rel_diff(wrong, correct) > 0.02:
                assert rel_diff(ours, wrong) > 0.01, f"engine behaves as if SelfExtend were on {label}"


@pytest.mark.parametrize("setting", [None, (2, 4)], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_prefill_chunks_and_decode_agree(root: Path, name: str, setting) -> None:
    path = _checkpoint(root, name)
    model, ref = _model(path), _reference(path)
    n = length(ref)
    ids = random_ids(n, ref.cfg["vocab_size"], seed=6)
    ext = se.SelfExtend(*setting) if setting else None
    full = model.logits(ids, self_extend=ext, chunk_size=n)
    for chunk in [1, 7, 37]:
        chunked = model.logits(ids, self_extend=ext, chunk_size=chunk)
        np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-5 * np.abs(full).max())
    prompt = random_ids(2 * ref.trained + 3, ref.cfg["vocab_size"], seed=7)
    out = model.generate(prompt, 12, self_extend=ext, chunk_size=5)
    assert out.token_ids == ref.greedy(prompt, 12, setting)


@pytest.mark.parametrize("name", NAMES)
def test_gguf_matches_safetensors(root: Path, name: str) -> None:
    """The f32 GGUF (of the variant a GGUF can describe, tiny_models.GGUF_EXPRESSIBLE)
    gives the safetensors checkpoint's logits, and both give the reference's."""
    path = _checkpoint(root, name, gguf_variant=True)
    g, model, ref = se.Model.load(_gguf(root, name)), _model(path), _reference(path)
    assert not g.quantized
    assert g.config.trained_context == ref.trained
    assert (g.config.num_layers, g.config.num_heads, g.config.num_kv_heads, g.config.head_dim) == \
        (ref.n_layers, ref.n_heads, ref.n_kv, ref.head_dim)
    n = length(ref)
    ids = random_ids(n, ref.cfg["vocab_size"], seed=8)
    for setting in [None, (2, 4)]:
        ext = se.SelfExtend(*setting) if setting else None
        ours = g.logits(ids, self_extend=ext, chunk_size=37)
        np.testing.assert_allclose(ours, model.logits(ids, self_extend=ext, chunk_size=37), rtol=0, atol=1e-4)
        assert_close(ours, ref.logits(ids, setting))


@pytest.mark.parametrize("name", ["llama31", "qwen2", "qwen3", "phi3"])
def test_gguf_tokenizer_matches_tokenizer_json(root: Path, name: str) -> None:
    """tokenizer.ggml.pre "llama-bpe" / "qwen2" / "default" / "gpt-4o" split text like the
    tokenizer.json regexes (digits in threes, one by one, GPT-2 style, case-aware)."""
    g = se.Model.load(_gguf(root, name))
    model = _model(_checkpoint(root, name, gguf_variant=True))
    text = ("The passkey is 4817, not 12345678. Remember it!  Ünïcödé 🦀 漢字\n\n  new line's <s> </s>"
            " It's John's HTTPServer, camelCaseWords DON'T stop.\n/here")
    assert g.tokenizer.encode(text) == model.tokenizer.encode(text)
    ids = model.tokenizer.encode(text)
    assert g.tokenizer.decode(ids) == model.tokenizer.decode(ids)

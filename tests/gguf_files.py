"""Writes tiny GGUF files from the tiny safetensors checkpoints, the way llama.cpp's
converter (convert_hf_to_gguf.py, run with transformers 4.x installed) writes them.

The Llama checkpoints of tiny_models.CONFIGS get llama.* metadata, a gpt2-style
tokenizer and q/k rows permuted for llama.cpp's interleaved RoPE, as before. The family
checkpoints (tiny_models.FAMILIES) follow the converter class registered for their
Hugging Face architecture; each convention below names the converter function it
comes from (ggml-org/llama.cpp convert_hf_to_gguf.py at commit 0024aa74). A July 2025
copy of the converter, run on these checkpoints, wrote the same tensors and model
metadata (apart from rope_freqs, see below, and rope.freq_base_swa, which it predates).

Architecture (ModelBase.register / model_arch):
- LlamaForCausalLM and MistralForCausalLM -> LlamaModel, arch "llama";
  Qwen2ForCausalLM -> Qwen2Model, "qwen2"; Qwen3ForCausalLM -> Qwen3Model, "qwen3";
  Gemma2ForCausalLM -> Gemma2Model, "gemma2"; Gemma3ForCausalLM -> Gemma3Model,
  "gemma3"; Phi3ForCausalLM -> Phi3MiniModel, "phi3".

Metadata:
- TextModel.set_gguf_parameters (llama, qwen2, qwen3, gemma3 through super()):
  block_count, context_length (max_position_embeddings), embedding_length,
  feed_forward_length, attention.head_count, attention.head_count_kv,
  rope.freq_base (rope_theta; the full_attention one in a per-layer-type config),
  rope.freq_base_swa (Gemma 3's rope_local_base_freq / sliding_attention theta),
  attention.layer_norm_rms_epsilon, attention.key_length/value_length only when
  config.json has a non-null head_dim, rope.scaling.type "linear" + rope.scaling.factor
  for linear scaling; for rope_type "llama3" it writes no rope.scaling.* key at all.
- LlamaModel.set_gguf_parameters adds vocab_size and rope.dimension_count (head_dim,
  else hidden_size / num_attention_heads). No sliding-window key for Mistral.
- Qwen2Model / Qwen3Model: nothing more; in particular no sliding-window key for Qwen2
  (llama.cpp runs every Qwen2 layer as full attention).
- Gemma2Model.set_gguf_parameters (does not call TextModel's): context_length,
  embedding_length, block_count, feed_forward_length, head_count, head_count_kv,
  layer_norm_rms_epsilon, key_length, value_length, attn_logit_softcapping,
  final_logit_softcapping, attention.sliding_window. No rope.freq_base (llama.cpp's
  default 10000 applies) and no query_pre_attn_scalar: llama.cpp scales scores by
  1/sqrt(key_length), or 1/sqrt(n_embd / n_head) for the 46-layer (27B) model only.
- Gemma3Model.set_gguf_parameters: TextModel's keys, then final_logit_softcapping only
  when set, attention.sliding_window unless sliding_window_pattern == 1. No layer
  pattern and no query_pre_attn_scalar: llama.cpp hard-codes every 6th layer global
  (and, in the versions read, the local RoPE base 10000).
- Phi3MiniModel.set_gguf_parameters (does not call TextModel's): context_length,
  rope.scaling.original_context_length, embedding_length, feed_forward_length,
  block_count, head_count, head_count_kv, layer_norm_rms_epsilon,
  rope.dimension_count = int(partial_rotary_factor * hidden_size) // num_attention_heads,
  rope.freq_base, attention.sliding_window (0 when null);
  Phi3MiniModel.generate_extra_tensors: rope.scaling.attn_factor =
  sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original (1 when
  s <= 1) for longrope, and tensors rope_factors_long.weight / rope_factors_short.weight
  (f32, one factor per rotary frequency). No rope.scaling.type key. (llama.cpp itself
  ignores Phi-3's sliding window and picks the long factors when its context size,
  not the sequence, exceeds the original length; transformers, and the reference,
  mask with the window and go by the sequence length.)
- TextModel: general.file_type. Vocabulary (TextModel._set_vocab_gpt2 /
  gguf.SpecialVocab): tokenizer.ggml.model "gpt2", token list, token types (3 for
  special added tokens, else 1), merges, bos/eos (and padding, from config.json's
  pad_token_id), add_bos_token (from tokenizer.json's TemplateProcessing).
  tokenizer.ggml.pre is chosen by the converter from a hash of the tokenizer's output
  (get_vocab_base_pre); the hash of our tiny tokenizers matches no model, so the label
  their regex belongs to is written: "qwen2" (Qwen2's split regex), "llama-bpe"
  (Llama 3's), "default" for the byte-level tokenizer.

Tensors:
- names: gguf's TensorNameMap for the arch (tests/test_families.py checks tensor_names
  against it): Gemma's post_attention_layernorm -> post_attention_norm,
  pre_feedforward_layernorm -> ffn_norm, post_feedforward_layernorm -> post_ffw_norm;
  Llama's post_attention_layernorm -> ffn_norm; q_norm/k_norm -> attn_q_norm/attn_k_norm;
  Phi-3's qkv_proj -> attn_qkv and gate_up_proj -> ffn_up (both kept fused; rows gate
  then up); lm_head -> output (absent when tied).
- LlamaModel.modify_tensors (undo_permute): q_proj/k_proj weights and biases permuted
  for llama.cpp's interleaved RoPE (heads, 2, d/2) -> (heads, d/2, 2); only arch
  "llama" does this: the other archs use NEOX (rotate-half) RoPE and keep HF rows.
- Gemma2Model.modify_tensors / Gemma3Model.modify_tensors (norm_shift): every tensor
  whose name ends in "norm.weight" gets + 1, i.e. the four layer norms, model.norm and,
  for Gemma 3, self_attn.q_norm / k_norm too; lm_head.weight is dropped (Gemma2);
  token_embd is cut to len(tokenizer.json vocab) + len(added_tokens) rows (Gemma 3;
  no-op here).
- LlamaModel.generate_extra_tensors: for rope_type "llama3", rope_freqs.weight (f32,
  head_dim / 2): 1 where the wavelength 2 pi / f < original / high_freq_factor, factor
  where > original / low_freq_factor, else 1 / ((1 - smooth) / factor + smooth) with
  smooth = (original / wavelength - low_freq_factor) / (high_freq_factor -
  low_freq_factor); llama.cpp divides each frequency by it. The converter reads
  `original` as config.json's top-level original_max_position_embeddings, default
  8192, although Llama 3.1 keeps it in rope_scaling (8192 there, so real checkpoints
  agree); our tiny model's is 16, so LLAMA3_ORIGINAL_FROM_ROPE_SCALING takes it from
  rope_scaling, which keeps the GGUF the same model as the safetensors.

What a GGUF cannot say: a Qwen2/Mistral sliding window, Gemma's query_pre_attn_scalar
(unless it equals head_dim) and Gemma 3's layer pattern (unless every 6th layer is
global) and local RoPE base (unless 10000). tiny_models.GGUF_EXPRESSIBLE lists the
config overrides under which each family's GGUF describes the same model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np
from safetensors.numpy import load_file

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Per-arch differences from LAYER.
ARCH_LAYER = {
    "qwen3": {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "gemma2": {"post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "gemma3": {"post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
}
ARCHS = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# See the docstring: False reproduces the converter's default of 8192.
LLAMA3_ORIGINAL_FROM_ROPE_SCALING = True


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf in NAMES:
        return NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{ARCH_LAYER.get(arch, {}).get(module) or LAYER[module]}.{param}"


def tensor_names(arch: str, hf_names: list[str]) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, for the tensors of a checkpoint the converter
    keeps."""
    return {n: gguf_name(n, arch) for n in hf_names if not (arch == "gemma2" and n == "lm_head.weight")}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_weights(ckpt: Path) -> dict[str, np.ndarray]:
    index = ckpt / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(ckpt / "model.safetensors"))
    weights: dict[str, np.ndarray] = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(load_file(str(ckpt / f)))
    return weights


def _add_tokenizer(w: gguf.GGUFWriter, cfg: dict[str, Any], tok: dict[str, Any], pre: str,
                   chat_template: Optional[str], pad: bool = False) -> None:
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv_: kv_[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if pad and cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)


def _add_tensor(w: gguf.GGUFWriter, name: str, t: np.ndarray, quant: Optional[str]) -> None:
    t = t.astype(np.float32)
    if quant and t.ndim == 2:
        qtype = getattr(gguf.GGMLQuantizationType, quant)
        data = gguf.quants.quantize(t, qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    else:
        w.add_tensor(name, t)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(ckpt: Path, out: Path, quant: Optional[str] = None,
               chat_template: Optional[str] = None) -> Path:
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("model_type", "llama") != "llama" or "rope_parameters" in cfg or cfg.get("transformers_version"):
        return _write_family(ckpt, cfg, out, quant, chat_template)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    weights = load_file(str(ckpt / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "llama")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    _add_tokenizer(w, cfg, tok, "default", chat_template)

    for name, t in weights.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute(t, heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute(t, kv)
        _add_tensor(w, gguf_name(name), t, quant)
    _finish(w)
    return out


# --- family checkpoints ------------------------------------------------------------------


def _rope(cfg: dict[str, Any], layer_type: str = "full_attention") -> tuple[Optional[float], dict[str, Any]]:
    """(theta, scaling dict or {}) in either config style."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if "full_attention" in params or "sliding_attention" in params:
            params = params.get(layer_type, {})
        params = dict(params)
        theta = params.pop("rope_theta", None)
        return theta, params
    if layer_type == "sliding_attention":
        return cfg.get("rope_local_base_freq"), {}
    return cfg.get("rope_theta"), dict(cfg.get("rope_scaling") or {})


def llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray:
    """LlamaModel.generate_extra_tensors, in float32 like the converter's torch code."""
    theta, s = _rope(cfg)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    factor = s.get("factor", 8.0)
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    if LLAMA3_ORIGINAL_FROM_ROPE_SCALING:
        old = s.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 8192))
    else:
        old = cfg.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = np.float32(2 * math.pi) / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = np.float32((old / wavelen - low) / (high - low))
            out.append(float(1 / ((1 - smooth) / np.float32(factor) + smooth)))
    return np.asarray(out, dtype=np.float32)


def tokenizer_pre(tok: dict[str, Any]) -> str:
    """tokenizer.ggml.pre for a tokenizer.json, by its Split regex (see the docstring)."""
    pre = tok.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        regex = (step.get("pattern") or {}).get("Regex", "") if step.get("type") == "Split" else ""
        if "\\p{Lu}" in regex:
            return "gpt-4o"
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe"
        if "\\p{N}|" in regex:
            return "qwen2"
    return "default"


def _write_family(ckpt: Path, cfg: dict[str, Any], out: Path, quant: Optional[str],
                  chat_template: Optional[str]) -> Path:
    hf_arch = cfg["architectures"][0]
    arch = ARCHS[hf_arch]
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    weights = _load_weights(ckpt)
    w = gguf.GGUFWriter(str(out), arch)
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim")
    hidden = cfg["hidden_size"]
    theta, scaling = _rope(cfg)
    kind = scaling.get("rope_type", scaling.get("type"))

    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant}"] if quant else gguf.LlamaFileType.ALL_F32)
    if arch in ("llama", "qwen2", "qwen3", "gemma3"):  # TextModel.set_gguf_parameters
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_freq_base(theta if theta is not None else (1_000_000.0 if arch == "gemma3" else 10000.0))
        local_theta, _ = _rope(cfg, "sliding_attention")
        if arch == "gemma3" and local_theta is not None:
            w.add_float32(f"{arch}.rope.freq_base_swa", local_theta)  # add_rope_freq_base_swa, gguf >= 0.18
        if head_dim is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim or hidden // heads)
    elif arch == "gemma2":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    elif arch == "gemma3":
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        if cfg.get("sliding_window_pattern") != 1:
            w.add_sliding_window(cfg["sliding_window"])
    elif arch == "phi3":
        params = cfg.get("rope_parameters") or {}
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        rope_dims = int(partial * hidden) // heads
        original = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(rope_dims)
        w.add_rope_freq_base(theta if theta is not None else 10000.0)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        if kind in ("longrope", "su"):
            scale = cfg["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)

    _add_tokenizer(w, cfg, tok, tokenizer_pre(tok), chat_template, pad=True)

    if arch == "llama" and kind == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    if arch == "phi3" and kind in ("longrope", "su"):
        w.add_tensor("rope_factors_long.weight", np.asarray(scaling["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(scaling["short_factor"], dtype=np.float32))
    names = tensor_names(arch, list(weights))
    for name, t in weights.items():
        if name not in names:
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute(t, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute(t, kv)
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            t = t.astype(np.float32) + 1
        if arch == "gemma3" and name == "model.embed_tokens.weight":
            t = t[: len(tok["model"]["vocab"]) + len(tok["added_tokens"])]
        _add_tensor(w, names[name], t, quant)
    _finish(w)
    return out

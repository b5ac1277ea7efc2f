"""Tiny random checkpoints in the Hugging Face layout, for tests and smoke runs.

Each checkpoint is a directory with config.json, tokenizer.json (a byte-level BPE
trained here) and model.safetensors, or shards plus model.safetensors.index.json.
Weights are random but scaled so attention is sharp: positions change the output.

Two kinds of checkpoint:
- CONFIGS (and WIDE_CONFIGS, BENCH_CONFIGS): Llama checkpoints whose config.json is
  written here;
- FAMILIES: one checkpoint per supported model family (Llama 3.1, Qwen2, Qwen3,
  Mistral, Gemma 2, Gemma 3, Phi-3). Their config.json is a fixture in tests/configs,
  written by transformers itself (tests/configs/generate.py), in the transformers 4.x
  style ("v4": rope_theta/rope_scaling) or the 5.x style ("v5": rope_parameters); both
  styles describe the same model and give the same weights. Tensor names are the
  Hugging Face ones of each family (fused qkv_proj/gate_up_proj for Phi-3, q/k norms
  for Qwen3 and Gemma 3, four norms per layer for Gemma).

    python tests/tiny_models.py OUT_DIR [--name gqa] [--style v5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A long context needs positions the model has never seen during training.",
    "Self-Extend maps distant positions onto ones the model knows, by floor division.",
    "Neighbor tokens keep their exact positions inside the window.",
    "Once upon a time there was a tiny language model with random weights.",
    "0123456789 The passkey is 4817. Remember it. What is the passkey?",
    "Ünïcödé text, emoji 🦀 and CJK 漢字 must round-trip through the tokenizer.",
] * 4

CASED_CORPUS = ["It's John's HTTPServer. McDonald's iPhone DON'T.\n/usr/bin/env camelCaseWords"] * 8

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]

CONFIGS: dict[str, dict[str, Any]] = {
    # Grouped-query attention, untied embeddings, a short trained context.
    "gqa": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    ),
    # Multi-head attention, tied embeddings, biases, linear RoPE scaling.
    "tied": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=3, max_position_embeddings=24, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, rope_theta=500.0,
        rope_scaling={"type": "linear", "factor": 2.0},
    ),
    # MQA with an explicit head_dim != hidden/heads, Llama 3 RoPE scaling, f16 shards.
    "llama3": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=32,
        tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    ),
    # The smallest useful model: the fuzzers' seed corpus (tests/fuzz).
    "micro": dict(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True,
    ),
}
# Head dimensions of real models, for the CUDA kernel's instantiations (tests/test_cuda.py);
# kept out of CONFIGS, which every CPU suite runs over.
WIDE_CONFIGS: dict[str, dict[str, Any]] = {
    "wide64": dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "wide128": dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    ),
}
# The default model's shape with random weights, for GPU benchmarks (scripts/bench-cuda):
# speed does not depend on the weights, and this avoids carrying the 98 MB GGUF.
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m-shape": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, vocab_size=49152,
    ),
}
ALL_CONFIGS = {**CONFIGS, **WIDE_CONFIGS, **BENCH_CONFIGS}
SHARDED = {"llama3": np.float16}

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Family checkpoints: name -> the Hugging Face architecture its fixture declares. Kept
# out of CONFIGS (the existing suites iterate CONFIGS); tests/test_families.py uses these.
FAMILIES: dict[str, str] = {
    "llama31": "LlamaForCausalLM",       # Llama 3.1 RoPE scaling, GQA, untied
    "qwen2": "Qwen2ForCausalLM",         # q/k/v biases; layer 0 global, layers 1-2 sliding (8)
    "qwen3": "Qwen3ForCausalLM",         # q/k RMSNorm over head_dim (24), tied
    "mistral": "MistralForCausalLM",     # sliding window 8 < trained context 32, MQA
    "mistral-wide": "MistralForCausalLM",  # sliding window 48 > trained context 32
    "gemma2": "Gemma2ForCausalLM",       # sandwich norms, soft-capping, local/global layers
    "gemma3": "Gemma3ForCausalLM",       # q/k norms, per-layer-type RoPE, local/global layers
    "phi3": "Phi3ForCausalLM",           # fused qkv/gate_up, partial rotary, LongRoPE
}
STYLES = ("v4", "v5")
# Config overrides (v4 vocabulary) under which a family's GGUF, written the way llama.cpp's
# converter writes it (tests/gguf_files.py), describes the same model as the safetensors:
# a GGUF has no key for Qwen2's or Mistral's sliding window, for Gemma's
# query_pre_attn_scalar (llama.cpp uses 1/sqrt(head_dim)), for Gemma 3's layer pattern
# (llama.cpp: every 6th layer global) or its local RoPE base (llama.cpp: 10000).
GGUF_EXPRESSIBLE: dict[str, dict[str, Any]] = {
    "llama31": {},
    "qwen2": {"use_sliding_window": False, "sliding_window": None,
              "layer_types": ["full_attention"] * 3},
    "qwen3": {},
    "mistral": {"sliding_window": None},
    "mistral-wide": {"sliding_window": None},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3": {"query_pre_attn_scalar": 16, "rope_local_base_freq": 10000.0,
               "num_hidden_layers": 6, "sliding_window_pattern": 6, "_sliding_window_pattern": 6,
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
    "phi3": {},
}
# Families whose tokenizer.json uses their real pre-tokenizer split regex; the others use
# the byte-level tokenizer of CONFIGS.
FAMILY_TOKENIZERS = {"qwen2": "qwen2", "llama31": "llama3", "phi3": "gpt4o"}
SPLIT_PATTERNS = {
    # Qwen2 / Qwen2.5 / Qwen3 tokenizer.json: digits one at a time.
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    # Llama 3 tokenizer.json: digits in groups of up to three.
    "llama3": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    # GPT-4o's o200k tokenizer.json, which Phi-4-mini uses: case-aware letter runs.
    "gpt4o": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
              r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


def build_tokenizer(kind: str = "bytelevel") -> Tokenizer:
    """A BPE trained on CORPUS. `kind` picks the pre-tokenizer: "bytelevel" (GPT-2's
    regex, inside the ByteLevel step) or a SPLIT_PATTERNS key (that model's Split regex,
    then ByteLevel without its own regex, as in Qwen2's and Llama 3's tokenizer.json)."""
    tok = Tokenizer(models.BPE())
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[kind]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Cased words and contractions, so the case-aware split makes merges the others
    # would not, and a wrong split shows in the ids.
    corpus = CORPUS + CASED_CORPUS if kind == "gpt4o" else CORPUS
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


# Large q/k weights give peaked attention, so a wrong position is visible.
DEFAULT_QK_SCALE = 0.45


def random_weights(cfg: dict[str, Any], seed: int,
                   qk_scale: float = DEFAULT_QK_SCALE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim", h // nq)
    vocab = cfg["vocab_size"]

    def u(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return rng.uniform(-scale, scale, size=shape).astype(np.float32)

    w = {"model.embed_tokens.weight": u((vocab, h), 1.0), "model.norm.weight": 1 + u((h,), 0.2)}
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = u((vocab, h), 0.3)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        w[f"{p}.self_attn.q_proj.weight"] = u((nq * d, h), qk_scale)
        w[f"{p}.self_attn.k_proj.weight"] = u((nkv * d, h), qk_scale)
        w[f"{p}.self_attn.v_proj.weight"] = u((nkv * d, h), 0.3)
        w[f"{p}.self_attn.o_proj.weight"] = u((h, nq * d), 0.3)
        w[f"{p}.mlp.gate_proj.weight"] = u((i, h), 0.3)
        w[f"{p}.mlp.up_proj.weight"] = u((i, h), 0.3)
        w[f"{p}.mlp.down_proj.weight"] = u((h, i), 0.3)
        w[f"{p}.input_layernorm.weight"] = 1 + u((h,), 0.2)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + u((h,), 0.2)
        if cfg.get("attention_bias"):
            for name, n in [("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d), ("o_proj", h)]:
                w[f"{p}.self_attn.{name}.bias"] = u((n,), 0.2)
        if cfg.get("mlp_bias"):
            for name, n in [("gate_proj", i), ("up_proj", i), ("down_proj", h)]:
                w[f"{p}.mlp.{name}.bias"] = u((n,), 0.2)
    return w


def family_config(name: str, style: str = "v4") -> dict[str, Any]:
    """The fixture config.json of a family checkpoint, in the given style."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    return json.loads((CONFIG_DIR / f"{name}.{style}.json").read_text())


def family_weights(name: str, cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random weights with the Hugging Face tensor names of the family. Only shapes are
    read from `cfg` (the same in both fixture styles), so both styles get the same
    weights. Gemma's norms store w and compute x * (1 + w): their weights are drawn
    around 0, the others' around 1, so a missing or doubled offset shows."""
    rng = np.random.default_rng(seed)
    model_type = cfg["model_type"]
    gemma = model_type in ("gemma2", "gemma3_text")
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nq
    vocab = cfg["vocab_size"]

    def u(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return rng.uniform(-scale, scale, size=shape).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return u((n,), 0.2) if gemma else 1 + u((n,), 0.2)

    def qk_norm(n: int) -> np.ndarray:
        # q/k norms make |q| = |k| = sqrt(head_dim) times the weight: larger weights
        # keep the attention peaked (scores up to |q||k|/sqrt(d) ~ 13-20 rather than ~4-5).
        return (1.0 if gemma else 2.0) + u((n,), 0.3)

    w = {"model.embed_tokens.weight": u((vocab, h), 1.0), "model.norm.weight": norm(h)}
    # transformers' default is tied: Gemma's 4.x config.json omits the key.
    if not cfg.get("tie_word_embeddings", True):
        w["lm_head.weight"] = u((vocab, h), 0.3)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        q, k, v = u((nq * d, h), 0.45), u((nkv * d, h), 0.45), u((nkv * d, h), 0.3)
        if model_type == "phi3":
            w[f"{p}.self_attn.qkv_proj.weight"] = np.concatenate([q, k, v])
        else:
            w[f"{p}.self_attn.q_proj.weight"] = q
            w[f"{p}.self_attn.k_proj.weight"] = k
            w[f"{p}.self_attn.v_proj.weight"] = v
        w[f"{p}.self_attn.o_proj.weight"] = u((h, nq * d), 0.3)
        if model_type == "qwen2":  # q/k/v biases, no o_proj bias
            for proj, n in [("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d)]:
                w[f"{p}.self_attn.{proj}.bias"] = u((n,), 0.2)
        if model_type in ("qwen3", "gemma3_text"):
            w[f"{p}.self_attn.q_norm.weight"] = qk_norm(d)
            w[f"{p}.self_attn.k_norm.weight"] = qk_norm(d)
        gate, up = u((i, h), 0.3), u((i, h), 0.3)
        if model_type == "phi3":
            w[f"{p}.mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
        else:
            w[f"{p}.mlp.gate_proj.weight"] = gate
            w[f"{p}.mlp.up_proj.weight"] = up
        w[f"{p}.mlp.down_proj.weight"] = u((h, i), 0.3)
        w[f"{p}.input_layernorm.weight"] = norm(h)
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
        if gemma:
            w[f"{p}.pre_feedforward_layernorm.weight"] = norm(h)
            w[f"{p}.post_feedforward_layernorm.weight"] = norm(h)
    return w


def _write_family(out: Path, name: str, seed: int, style: str,
                  overrides: Optional[dict[str, Any]]) -> None:
    tok = build_tokenizer(FAMILY_TOKENIZERS.get(name, "bytelevel"))
    tok.save(str(out / "tokenizer.json"))
    if overrides:
        cfg = {**family_config(name, style), **overrides}
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    else:
        # Byte for byte what transformers wrote.
        (out / "config.json").write_text((CONFIG_DIR / f"{name}.{style}.json").read_text())
        cfg = family_config(name, style)
    assert cfg["vocab_size"] == tok.get_vocab_size(), "regenerate tests/configs"
    save_file(family_weights(name, cfg, seed), str(out / "model.safetensors"))


def write_checkpoint(out: Path, name: str = "gqa", seed: int = 0, style: str = "v4",
                     overrides: Optional[dict[str, Any]] = None,
                     qk_scale: float = DEFAULT_QK_SCALE) -> Path:
    """Writes the named tiny checkpoint into `out` and returns `out`.

    For a FAMILIES name, `style` picks the config fixture ("v4" or "v5"), and
    `overrides` (top-level config.json keys, in that style's vocabulary) changes the
    model; the weights depend on the name, the seed and the shapes only.

    `qk_scale` bounds the q/k projection weights of the Llama checkpoints. The default
    makes attention so peaked (scores of tens) that a wrong position shows at f32, but
    then bf16 rounding of the scores alone moves the logits by 5-30%; tests of half
    precision pass a smaller one."""
    out.mkdir(parents=True, exist_ok=True)
    if name in FAMILIES and qk_scale != DEFAULT_QK_SCALE:
        raise ValueError(f"{name!r} is a family checkpoint; qk_scale is for the Llama ones")
    if name in FAMILIES:
        _write_family(out, name, seed, style, overrides)
        return out
    if style != "v4" or overrides:
        raise ValueError(f"{name!r} has no config styles or overrides; only FAMILIES do")
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": tok.get_vocab_size(),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
        **ALL_CONFIGS[name],
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = random_weights(cfg, seed, qk_scale)
    if name in SHARDED:
        dtype = SHARDED[name]
        names = sorted(weights)
        half = len(names) // 2
        index: dict[str, Any] = {"metadata": {}, "weight_map": {}}
        for k, part in enumerate([names[:half], names[half:]]):
            fname = f"model-{k + 1:05d}-of-00002.safetensors"
            save_file({n: weights[n].astype(dtype) for n in part}, str(out / fname))
            index["weight_map"].update({n: fname for n in part})
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file(weights, str(out / "model.safetensors"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--name", choices=sorted({**ALL_CONFIGS, **FAMILIES}), default="gqa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=STYLES, default="v4", help="config.json style (FAMILIES only)")
    args = parser.parse_args()
    print(write_checkpoint(args.out, args.name, args.seed, args.style))


if __name__ == "__main__":
    main()

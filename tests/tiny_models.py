"""Tiny random Llama checkpoints in the Hugging Face layout, for tests and smoke runs.

Each checkpoint is a directory with config.json, tokenizer.json (a byte-level BPE
trained here) and model.safetensors, or shards plus model.safetensors.index.json.
Weights are random but scaled so attention is sharp: positions change the output.

    python tests/tiny_models.py OUT_DIR [--name gqa]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A long context needs positions the model has never seen during training.",
    "Self-Extend maps distant positions onto ones the model knows, by floor division.",
    "Neighbor tokens keep their exact positions inside the window.",
    "Once upon a time there was a tiny language model with random weights.",
    "0123456789 The passkey is 4817. Remember it. What is the passkey?",
    "Ünïcödé text, emoji 🦀 and CJK 漢字 must round-trip through the tokenizer.",
] * 4

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


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def random_weights(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
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
        # Large q/k weights give peaked attention, so a wrong position is visible.
        w[f"{p}.self_attn.q_proj.weight"] = u((nq * d, h), 0.45)
        w[f"{p}.self_attn.k_proj.weight"] = u((nkv * d, h), 0.45)
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


def write_checkpoint(out: Path, name: str = "gqa", seed: int = 0) -> Path:
    """Writes the named tiny checkpoint into `out` and returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
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
    weights = random_weights(cfg, seed)
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
    parser.add_argument("--name", choices=sorted(ALL_CONFIGS), default="gqa")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_checkpoint(args.out, args.name, args.seed))


if __name__ == "__main__":
    main()

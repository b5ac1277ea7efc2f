"""Regenerates the config fixtures in this directory with transformers itself.

Each family has two fixtures: `<name>.v4.json`, written by transformers 4.x, and
`<name>.v5.json`, written by transformers 5.x (which replaces `rope_theta`/`rope_scaling`
with `rope_parameters`, per layer type where a model has several). Both describe the
same tiny model; tests/tiny_models.py writes its family checkpoints from them.

This script is not run by the test suite (CI has no transformers). Run it once per
major version, each from a virtualenv that has that transformers (no torch needed):

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers<5" tokenizers safetensors numpy
    python -m venv /tmp/tf5 && /tmp/tf5/bin/pip install "transformers>=5" tokenizers safetensors numpy
    /tmp/tf4/bin/python tests/configs/generate.py   # writes *.v4.json
    /tmp/tf5/bin/python tests/configs/generate.py   # writes *.v5.json, and checks each
                                                    # v4 fixture loads into the same config

The fixtures were last written by transformers 4.57.6 and 5.24.0. What they show a
config reader must handle: 4.x omits keys equal to the PretrainedConfig default (the
Gemma fixtures have no tie_word_embeddings: true is the default) and writes
`"head_dim": null` for Mistral; 5.x moves partial_rotary_factor and
original_max_position_embeddings into rope_parameters (Phi-3) and writes Gemma 3's
`_sliding_window_pattern` as 6 whatever layer_types says (layer_types is what counts).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tiny_models import FAMILY_TOKENIZERS, SPECIAL_TOKENS, build_tokenizer  # noqa: E402

MAJOR = int(transformers.__version__.split(".")[0])
STYLE = "v5" if MAJOR >= 5 else "v4"

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Phi-3.5 style LongRoPE: one factor per rotary frequency (rotary dim 8 -> 4 factors).
PHI3_SHORT = [1.0, 1.15, 1.4, 1.9]
PHI3_LONG = [1.0, 2.0, 4.5, 8.0]


def families() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (config class, architecture, constructor kwargs for this major version)."""
    v5 = STYLE == "v5"

    def rope(theta: float, scaling: dict[str, Any] | None = None) -> dict[str, Any]:
        if v5:
            params = {"rope_type": "default", "rope_theta": theta}
            params.update(scaling or {})
            return {"rope_parameters": params}
        return {"rope_theta": theta, **({"rope_scaling": scaling} if scaling else {})}

    common = dict(rms_norm_eps=1e-5)
    mistral = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
        **common, **rope(10000.0),
    )
    gemma3_rope: dict[str, Any]
    if v5:
        gemma3_rope = {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            # What `sliding_window_pattern=2` expands to in both versions.
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        }
    else:
        gemma3_rope = {
            "rope_theta": 1000.0, "rope_local_base_freq": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "sliding_window_pattern": 2,
        }
    phi3_scaling: dict[str, Any] = {"short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}
    # transformers 4.x validates exactly three keys, spelled `type` (Phi-3.5's config.json).
    phi3_scaling = {"rope_type": "longrope", **phi3_scaling} if v5 else {"type": "longrope", **phi3_scaling}
    phi3_rope: dict[str, Any] = (
        {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, **phi3_scaling}}
        if v5 else {"rope_theta": 10000.0, "rope_scaling": phi3_scaling, "partial_rotary_factor": 0.5}
    )
    return {
        "llama31": ("LlamaConfig", "LlamaForCausalLM", dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
            tie_word_embeddings=False, **common, **rope(10000.0, LLAMA3_ROPE),
        )),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
            use_sliding_window=True, sliding_window=8, max_window_layers=1,
            **common, **rope(10000.0),
        )),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=32,
            tie_word_embeddings=True, use_sliding_window=False, attention_bias=False,
            **common, **rope(10000.0),
        )),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(mistral, sliding_window=8)),
        "mistral-wide": ("MistralConfig", "MistralForCausalLM", dict(mistral, sliding_window=48)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=32, sliding_window=8,
            query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
            hidden_activation="gelu_pytorch_tanh", pad_token_id=2, **rope(10000.0),
        )),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=32, sliding_window=8,
            query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh", pad_token_id=2,
            **gemma3_rope,
        )),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
            sliding_window=96, tie_word_embeddings=False, pad_token_id=2, **common, **phi3_rope,
        )),
    }


def tokenizer_ids(name: str) -> dict[str, Any]:
    tok = build_tokenizer(FAMILY_TOKENIZERS.get(name, "bytelevel"))
    bos, eos, _ = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    return {"vocab_size": tok.get_vocab_size(), "bos_token_id": bos, "eos_token_id": eos}


def write(name: str, cls_name: str, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    cls = getattr(transformers, cls_name)
    dtype = {"dtype": "float32"} if STYLE == "v5" else {"torch_dtype": "float32"}
    config = cls(architectures=[arch], **tokenizer_ids(name), **dtype, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)  # config.json exactly as transformers writes it
        text = (Path(tmp) / "config.json").read_text()
    (HERE / f"{name}.{STYLE}.json").write_text(text)
    return json.loads(text)


# Keys a loaded config keeps from the style it came from without changing the model:
# Gemma 3's pattern (layer_types, compared, is what the model uses; v5 stores its default
# 6 as `_sliding_window_pattern` whatever layer_types says), Phi-3's copy of
# partial_rotary_factor at the top level and the legacy `type` key of its rope dict.
LEGACY = {"transformers_version", "sliding_window_pattern", "_sliding_window_pattern",
          "partial_rotary_factor"}


def semantic(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in LEGACY}
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {k: v for k, v in out["rope_parameters"].items() if k != "type"}
    return out


def main() -> None:
    print(f"transformers {transformers.__version__}: writing *.{STYLE}.json")
    for name, (cls_name, arch, kwargs) in families().items():
        written = write(name, cls_name, arch, kwargs)
        if STYLE == "v5" and (HERE / f"{name}.v4.json").exists():
            # The v4 fixture, loaded by transformers 5, must be the same model.
            cls = getattr(transformers, cls_name)
            old = semantic(cls.from_dict(json.loads((HERE / f"{name}.v4.json").read_text())).to_dict())
            new = semantic(cls.from_dict(written).to_dict())
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            if diff:
                raise SystemExit(f"{name}: the v4 fixture, loaded by transformers 5, differs: {diff}")
            print(f"  {name}: ok (same model as {name}.v4.json)")
        else:
            print(f"  {name}: ok")


if __name__ == "__main__":
    main()

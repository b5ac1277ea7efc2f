"""An independent numpy (float64) forward pass of a checkpoint with vanilla or SelfExtend
attention. It shares no code with selfextend_rs: it reads config.json (transformers 4.x
style, rope_theta/rope_scaling, or 5.x style, rope_parameters) and the safetensors
files itself and writes every formula out, following the transformers modeling code of
each family:

- llama, mistral: RMSNorm x / rms(x) * w, SiLU-gated MLP, RoPE (rotate-half), scores
  scaled by head_dim ** -0.5; Mistral masks every layer with its sliding window.
- qwen2: as llama plus q/k/v biases; layer i is "sliding_attention" (window
  sliding_window) when layer_types says so (transformers derives layer_types from
  use_sliding_window, sliding_window and max_window_layers: layers i >= max_window_layers
  slide).
- qwen3: as llama plus an RMSNorm (weight over head_dim) on each q and k head before RoPE.
- gemma2: embeddings times sqrt(hidden_size); RMSNorm computes x / rms(x) * (1 + w);
  sandwich norms (input_layernorm, post_attention_layernorm on the attention output
  before the residual add, pre_feedforward_layernorm, post_feedforward_layernorm on the
  MLP output before the add); GELU (tanh approximation) gate; scores scaled by
  query_pre_attn_scalar ** -0.5, then soft-capped cap * tanh(s / cap)
  (attn_logit_softcapping), then masked; final logits soft-capped likewise
  (final_logit_softcapping); layer_types alternate sliding (even) and full (odd).
- gemma3: as gemma2 without soft-capping (unless the config sets it), plus Gemma-style
  (1 + w) RMSNorms on each q and k head before RoPE; "sliding_attention" layers use
  RoPE base rope_local_base_freq (5.x: rope_parameters.sliding_attention) and no
  scaling, "full_attention" layers rope_theta with rope_scaling (5.x:
  rope_parameters.full_attention).
- phi3: fused qkv_proj (rows q, k, v) and gate_up_proj (rows gate, up); partial rotary:
  the first int(head_dim * partial_rotary_factor) dims of each head rotate (rotate-half
  within them), the rest pass through; LongRoPE: inv_freq = 1 / (ext * theta **
  (2i / rotary_dim)) with ext = long_factor when the sequence is longer than
  original_max_position_embeddings, else short_factor, and cos/sin multiplied by
  attention_factor (default sqrt(1 + ln(s) / ln(original)) with s =
  max_position_embeddings / original, 1 when s <= 1); every layer masked by
  sliding_window when set.

A sliding window w lets query i see key j iff 0 <= i - j < w (transformers'
masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window).

SelfExtend (Jin et al., 2024): a query at position i scores a key at j <= i with RoPE
positions (i, j) when i - j < W, and (i // G + W - W // G, j // G) otherwise; one
softmax spans both. Which layers get it (the rule selfextend_rs documents): with
L = max_position_embeddings, a layer with a sliding window w <= L is local and keeps
plain attention within its window; a layer with no window, or a window w > L, is global:
it gets SelfExtend and is still masked by its window if it has one.

RoPE baselines, as `rope=(kind, factor)` on a sequence of n tokens with trained context
L and rotary dimension d, replace the RoPE of the layers SelfExtend would extend (their
own scaling included; LongRoPE's attention factor becomes 1):
- "linear" (position interpolation): positions divided by the factor s;
- "ntk": base theta * s ** (d / (d - 2));
- "dynamic_ntk": for n > L, base theta * (s * n / L - (s - 1)) ** (d / (d - 2)).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union, cast

import numpy as np
from safetensors.numpy import load_file

FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}


@dataclass
class LayerRope:
    theta: float
    scaling: Optional[dict[str, Any]]  # the rope_scaling dict; None for plain RoPE
    rotary_dim: int


class Reference:
    def __init__(self, path: Path):
        self.cfg: dict[str, Any] = json.loads((path / "config.json").read_text())
        index = path / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        self.w: dict[str, np.ndarray] = {}
        for f in files:
            self.w.update({k: v.astype(np.float64) for k, v in load_file(str(path / f)).items()})
        c = self.cfg
        self.model_type = c.get("model_type", "llama")
        if self.model_type not in FAMILIES:
            raise ValueError(f"no reference for model_type {self.model_type!r}")
        self.gemma = self.model_type in ("gemma2", "gemma3_text")
        self.n_layers = c["num_hidden_layers"]
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_heads
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq = self._inv_freq()

    # Read from self.cfg at each use, so a test may edit the config after loading.
    @property
    def trained(self) -> int:
        """The trained context L: max_position_embeddings."""
        return self.cfg["max_position_embeddings"]

    @property
    def windows(self) -> list[Optional[int]]:
        """Each layer's sliding window, None for full attention."""
        return self._windows()

    @property
    def ropes(self) -> list[LayerRope]:
        return [self._layer_rope(layer) for layer in range(self.n_layers)]

    # --- configuration, in either style ---------------------------------------------

    def _rope_params(self, layer_type: Optional[str] = None) -> tuple[float, Optional[dict[str, Any]]]:
        """(theta, scaling) of a layer type, from rope_parameters (transformers 5) or
        rope_theta / rope_scaling / rope_local_base_freq (transformers 4)."""
        c = self.cfg
        params: Any = c.get("rope_parameters")
        if params is not None:
            if "full_attention" in params or "sliding_attention" in params:
                params = params[layer_type or "full_attention"]
            params = dict(params)
            theta = params.pop("rope_theta")
            kind = params.get("rope_type", params.get("type"))
            return theta, (None if kind in (None, "default") else params)
        if layer_type == "sliding_attention" and self.model_type == "gemma3_text":
            return c.get("rope_local_base_freq", 10000.0), None
        scaling = c.get("rope_scaling")
        kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        return c.get("rope_theta", 10000.0), (None if kind in (None, "default") else scaling)

    def _layer_types(self) -> list[str]:
        c = self.cfg
        if c.get("layer_types"):
            return list(c["layer_types"])
        n = self.n_layers
        if self.model_type in ("qwen2", "qwen3"):
            sliding = c.get("sliding_window") if c.get("use_sliding_window") else None
            start = c.get("max_window_layers", 28)
            return ["sliding_attention" if sliding is not None and i >= start else "full_attention"
                    for i in range(n)]
        if self.model_type == "gemma2":
            return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        if self.model_type == "gemma3_text":
            pattern = c.get("sliding_window_pattern", 6)
            return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        return ["full_attention"] * n

    def _windows(self) -> list[Optional[int]]:
        c = self.cfg
        if self.model_type in ("mistral", "phi3"):
            return [c.get("sliding_window")] * self.n_layers
        if self.model_type == "llama":
            return [None] * self.n_layers
        return [c.get("sliding_window") if t == "sliding_attention" else None for t in self._layer_types()]

    def _layer_rope(self, layer: int) -> LayerRope:
        layer_type = self._layer_types()[layer] if self.model_type == "gemma3_text" else None
        theta, scaling = self._rope_params(layer_type)
        params = self.cfg.get("rope_parameters") or {}
        factor = params.get("partial_rotary_factor", self.cfg.get("partial_rotary_factor", 1.0))
        return LayerRope(theta, scaling, int(self.head_dim * factor))

    def extended_layers(self) -> list[int]:
        """The layers SelfExtend applies to: no sliding window, or one longer than the
        trained context."""
        return [i for i, w in enumerate(self.windows) if w is None or w > self.trained]

    # --- RoPE -------------------------------------------------------------------------

    def with_rope(self, rope: Optional[tuple[str, float]], n: int, layer: Optional[int] = None) -> np.ndarray:
        """Inverse frequencies of a (global) layer for a sequence of n tokens under a
        RoPE baseline, or its own RoPE when `rope` is None."""
        layer = self._first_global() if layer is None else layer
        if rope is None:
            return self._layer_inv_freq(layer, n)[0]
        kind, s = rope
        lr = self._layer_rope(layer)
        d, theta = lr.rotary_dim, lr.theta
        exponents = np.arange(0, d, 2, dtype=np.float64) / d
        if kind == "linear":
            return 1.0 / theta**exponents / s
        if kind == "ntk":
            return 1.0 / (theta * s ** (d / (d - 2))) ** exponents
        if kind == "dynamic_ntk":
            base = theta * (s * n / self.trained - (s - 1)) ** (d / (d - 2)) if n > self.trained else theta
            return 1.0 / base**exponents
        raise ValueError(kind)

    def _first_global(self) -> int:
        ext = self.extended_layers()
        return ext[0] if ext else 0

    def _inv_freq(self) -> np.ndarray:
        """The (first global) layer's inverse frequencies for short sequences."""
        return self._layer_inv_freq(self._first_global(), 1)[0]

    def _layer_inv_freq(self, layer: int, n: int) -> tuple[np.ndarray, float]:
        """(inverse frequencies, cos/sin multiplier) of a layer for n tokens."""
        lr = self._layer_rope(layer)
        d, s = lr.rotary_dim, lr.scaling or {}
        inv = 1.0 / lr.theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        kind = s.get("rope_type", s.get("type"))
        if kind == "linear":
            inv = inv / s["factor"]
        elif kind == "llama3":
            factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            inv = np.where(medium, smoothed, scaled)
        elif kind in ("longrope", "su"):
            return self._longrope(lr, n)
        elif kind is not None:
            raise ValueError(f"no reference for RoPE scaling {kind!r}")
        return inv, 1.0

    def _longrope(self, lr: LayerRope, n: int) -> tuple[np.ndarray, float]:
        s, c = lr.scaling or {}, self.cfg
        top_original = c.get("original_max_position_embeddings")
        original = s.get("original_max_position_embeddings") or top_original or self.trained
        if "rope_parameters" in c:  # transformers 5: the dict's factor, else the ratio
            factor = s.get("factor") or self.trained / original
        else:  # transformers 4: the ratio whenever the config has the original length
            factor = self.trained / top_original if top_original else s.get("factor", 1.0)
        attention = s.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = np.asarray(s["long_factor"] if n > original else s["short_factor"], dtype=np.float64)
        d = lr.rotary_dim
        return 1.0 / (ext * lr.theta ** (np.arange(0, d, 2, dtype=np.float64) / d)), attention

    def rope(self, x: np.ndarray, pos: np.ndarray, inv_freq: Optional[np.ndarray] = None,
             attention_factor: float = 1.0) -> np.ndarray:
        """x: (heads, n, d) rotated so that row t sits at position pos[t]. The first
        2 * len(inv_freq) dims rotate (rotate-half within them); the rest pass through."""
        inv_freq = self.inv_freq if inv_freq is None else inv_freq
        ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, axis=-1)
        sin = np.concatenate([np.sin(ang)] * 2, axis=-1)
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        rd = 2 * len(inv_freq)
        xr, rest = (x, None) if rd == x.shape[-1] else (x[..., :rd], x[..., rd:])
        half = rd // 2
        rotated = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
        out = xr * cos + rotated * sin
        return out if rest is None else np.concatenate([out, rest], axis=-1)

    # --- layers -----------------------------------------------------------------------

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, se: Optional[tuple[int, int]],
                  inv_freq: np.ndarray, window: Optional[int] = None, attention_factor: float = 1.0,
                  scale: Optional[float] = None, softcap: Optional[float] = None) -> np.ndarray:
        n = q.shape[1]
        rep = self.n_heads // self.n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        pos = np.arange(n)
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        af = attention_factor
        scores = self.rope(q, pos, inv_freq, af) @ self.rope(k, pos, inv_freq, af).transpose(0, 2, 1) * scale
        if se is not None:
            g, w = se
            gq, gk = self.rope(q, pos // g + w - w // g, inv_freq, af), self.rope(k, pos // g, inv_freq, af)
            grouped = gq @ gk.transpose(0, 2, 1) * scale
            neighbor = (pos[:, None] - pos[None, :]) < w
            scores = np.where(neighbor[None], scores, grouped)
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        visible = np.tril(np.ones((n, n), bool))
        if window is not None:
            visible &= (pos[:, None] - pos[None, :]) < window
        scores = np.where(visible[None], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(-1, keepdims=True)
        return p @ v

    def rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Llama's x / rms(x) * w, or Gemma's x / rms(x) * (1 + w)."""
        if self.gemma:
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * (1.0 + weight)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def act(self, x: np.ndarray) -> np.ndarray:
        name = self.cfg.get("hidden_activation") or self.cfg.get("hidden_act", "silu")
        if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        if name == "silu":
            return x / (1.0 + np.exp(-x))
        raise ValueError(f"no reference for activation {name!r}")

    def qkv(self, h: np.ndarray, p: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, d = h.shape[0], self.head_dim
        if self.model_type == "phi3":
            qkv = self.linear(h, f"{p}.self_attn.qkv_proj")
            nq, nk = self.n_heads * d, self.n_kv * d
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        else:
            q = self.linear(h, f"{p}.self_attn.q_proj")
            k = self.linear(h, f"{p}.self_attn.k_proj")
            v = self.linear(h, f"{p}.self_attn.v_proj")
        q = q.reshape(n, self.n_heads, d).transpose(1, 0, 2)
        k = k.reshape(n, self.n_kv, d).transpose(1, 0, 2)
        v = v.reshape(n, self.n_kv, d).transpose(1, 0, 2)
        if f"{p}.self_attn.q_norm.weight" in self.w:  # Qwen3, Gemma 3: per-head norms
            q = self.rms_norm(q, self.w[f"{p}.self_attn.q_norm.weight"])
            k = self.rms_norm(k, self.w[f"{p}.self_attn.k_norm.weight"])
        return q, k, v

    def mlp(self, h: np.ndarray, p: str) -> np.ndarray:
        if self.model_type == "phi3":
            gate, up = np.split(self.linear(h, f"{p}.mlp.gate_up_proj"), 2, axis=-1)
        else:
            gate, up = self.linear(h, f"{p}.mlp.gate_proj"), self.linear(h, f"{p}.mlp.up_proj")
        return self.linear(self.act(gate) * up, f"{p}.mlp.down_proj")

    # --- the model --------------------------------------------------------------------

    def logits(self, ids: list[int], se: Optional[tuple[int, int]] = None,
               rope: Optional[tuple[str, float]] = None,
               se_layers: Union[None, str, Iterable[int]] = None) -> np.ndarray:
        """(n, vocab) logits. `se_layers` overrides which layers get SelfExtend and the
        RoPE baseline (default: extended_layers()); "all" extends every layer, to check
        that an engine does not."""
        n, d, c = len(ids), self.head_dim, self.cfg
        if se_layers is None:
            extended = set(self.extended_layers())
        elif se_layers == "all":
            extended = set(range(self.n_layers))
        else:
            extended = set(cast(Iterable[int], se_layers))
        scale = c["query_pre_attn_scalar"] ** -0.5 if self.gemma else None
        softcap = c.get("attn_logit_softcapping") if self.gemma else None
        windows = self.windows
        x = self.w["model.embed_tokens.weight"][np.asarray(ids)]
        if self.gemma:
            x = x * np.float64(np.float32(c["hidden_size"] ** 0.5))
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}"
            ext = layer in extended
            inv_freq, af = self._layer_inv_freq(layer, n)
            if ext and rope is not None:
                inv_freq, af = self.with_rope(rope, n, layer), 1.0
            h = self.rms_norm(x, self.w[f"{p}.input_layernorm.weight"])
            q, k, v = self.qkv(h, p)
            a = self.attention(q, k, v, se if ext else None, inv_freq, windows[layer], af, scale, softcap)
            a = self.linear(a.transpose(1, 0, 2).reshape(n, self.n_heads * d), f"{p}.self_attn.o_proj")
            if self.gemma:
                x = x + self.rms_norm(a, self.w[f"{p}.post_attention_layernorm.weight"])
                h = self.rms_norm(x, self.w[f"{p}.pre_feedforward_layernorm.weight"])
                x = x + self.rms_norm(self.mlp(h, p), self.w[f"{p}.post_feedforward_layernorm.weight"])
            else:
                x = x + a
                h = self.rms_norm(x, self.w[f"{p}.post_attention_layernorm.weight"])
                x = x + self.mlp(h, p)
        x = self.rms_norm(x, self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        out = x @ head.T
        cap = c.get("final_logit_softcapping") if self.gemma else None
        return out if cap is None else cap * np.tanh(out / cap)

    def greedy(self, ids: list[int], max_new_tokens: int, se: Optional[tuple[int, int]] = None) -> list[int]:
        """The argmax chain, stopping after an EOS (which is not included)."""
        eos = self.cfg.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        seq, out = list(ids), []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.logits(seq, se)[-1]))
            if nxt in eos_ids:
                break
            out.append(nxt)
            seq.append(nxt)
        return out

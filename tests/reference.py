"""An independent numpy (float64) forward pass of a Llama checkpoint with vanilla or
SelfExtend attention. It shares no code with selfextend_rs: it reads config.json and
the safetensors files itself and writes every formula out.

SelfExtend (Jin et al., 2024): a query at position i scores a key at j <= i with
RoPE positions (i, j) when i - j < W, and (i // G + W - W // G, j // G) otherwise;
one softmax spans both.

RoPE baselines, as `rope=(kind, factor)` on a sequence of n tokens with trained
context L and head dimension d:
- "linear" (position interpolation): positions divided by the factor s;
- "ntk": base theta * s ** (d / (d - 2));
- "dynamic_ntk": for n > L, base theta * (s * n / L - (s - 1)) ** (d / (d - 2)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors.numpy import load_file


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
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads", self.n_heads)
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq = self._inv_freq()

    def with_rope(self, rope: Optional[tuple[str, float]], n: int) -> np.ndarray:
        """Inverse frequencies for a sequence of n tokens under a RoPE baseline."""
        if rope is None:
            return self._inv_freq()
        kind, s = rope
        d = self.head_dim
        theta = self.cfg.get("rope_theta", 10000.0)
        trained = self.cfg["max_position_embeddings"]
        exponents = np.arange(0, d, 2, dtype=np.float64) / d
        if kind == "linear":
            return 1.0 / theta**exponents / s
        if kind == "ntk":
            return 1.0 / (theta * s ** (d / (d - 2))) ** exponents
        if kind == "dynamic_ntk":
            base = theta * (s * n / trained - (s - 1)) ** (d / (d - 2)) if n > trained else theta
            return 1.0 / base**exponents
        raise ValueError(kind)

    def _inv_freq(self) -> np.ndarray:
        d = self.head_dim
        theta = self.cfg.get("rope_theta", 10000.0)
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        s = self.cfg.get("rope_scaling")
        kind = None if s is None else s.get("rope_type", s.get("type"))
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
        return inv

    def rope(self, x: np.ndarray, pos: np.ndarray, inv_freq: Optional[np.ndarray] = None) -> np.ndarray:
        """x: (heads, n, d) rotated so that row t sits at position pos[t]."""
        inv_freq = self.inv_freq if inv_freq is None else inv_freq
        ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, axis=-1)
        sin = np.concatenate([np.sin(ang)] * 2, axis=-1)
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, se: Optional[tuple[int, int]],
                  inv_freq: np.ndarray) -> np.ndarray:
        n = q.shape[1]
        rep = self.n_heads // self.n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        pos = np.arange(n)
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = self.rope(q, pos, inv_freq) @ self.rope(k, pos, inv_freq).transpose(0, 2, 1) * scale
        if se is not None:
            g, w = se
            gq, gk = self.rope(q, pos // g + w - w // g, inv_freq), self.rope(k, pos // g, inv_freq)
            grouped = gq @ gk.transpose(0, 2, 1) * scale
            neighbor = (pos[:, None] - pos[None, :]) < w
            scores = np.where(neighbor[None], scores, grouped)
        scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(-1, keepdims=True)
        return p @ v

    def rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def logits(self, ids: list[int], se: Optional[tuple[int, int]] = None,
               rope: Optional[tuple[str, float]] = None) -> np.ndarray:
        n, d = len(ids), self.head_dim
        inv_freq = self.with_rope(rope, n)
        x = self.w["model.embed_tokens.weight"][np.asarray(ids)]
        for layer in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            h = self.rms_norm(x, self.w[f"{p}.input_layernorm.weight"])
            q = self.linear(h, f"{p}.self_attn.q_proj").reshape(n, self.n_heads, d).transpose(1, 0, 2)
            k = self.linear(h, f"{p}.self_attn.k_proj").reshape(n, self.n_kv, d).transpose(1, 0, 2)
            v = self.linear(h, f"{p}.self_attn.v_proj").reshape(n, self.n_kv, d).transpose(1, 0, 2)
            a = self.attention(q, k, v, se, inv_freq).transpose(1, 0, 2).reshape(n, self.n_heads * d)
            x = x + self.linear(a, f"{p}.self_attn.o_proj")
            h = self.rms_norm(x, self.w[f"{p}.post_attention_layernorm.weight"])
            gate = self.linear(h, f"{p}.mlp.gate_proj")
            silu = gate / (1.0 + np.exp(-gate))
            x = x + self.linear(silu * self.linear(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
        x = self.rms_norm(x, self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return x @ head.T

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

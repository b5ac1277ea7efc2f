"""Smoke test of the benchmark binary: it runs and its JSON parses (not its speed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def bench_binary() -> Path:
    explicit = os.environ.get("SELFEXTEND_BENCH")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "selfextend-bench"


def test_bench_json(model_path: Path) -> None:
    exe = bench_binary()
    assert exe.exists(), f"build it first: cargo build -p selfextend-bench ({exe})"
    out = subprocess.run(
        [str(exe), "--model", str(model_path), "--prefill", "40,80", "--decode-context", "60",
         "--decode-tokens", "4", "--group-size", "2", "--window", "8", "--repeats", "2", "--json"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(out.stdout)
    phases = [(m["phase"], m["attention"], m["context"]) for m in report["measurements"]]
    assert phases == [
        ("prefill", "vanilla", 40), ("prefill", "selfextend", 40),
        ("prefill", "vanilla", 80), ("prefill", "selfextend", 80),
        ("decode", "vanilla", 60), ("decode", "selfextend", 60),
    ]
    assert all(m["median_seconds"] > 0 and len(m["seconds"]) == 2 for m in report["measurements"])
    assert report["kv_cache_bytes"] > 0


def test_bench_one_attention_decoding_after_its_prefill(model_path: Path) -> None:
    out = subprocess.run(
        [str(bench_binary()), "--model", str(model_path), "--prefill", "40", "--decode-context", "40",
         "--decode-tokens", "3", "--attention", "selfextend", "--repeats", "1", "--warm-up", "--json"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(out.stdout)
    phases = [(m["phase"], m["attention"], m["context"], m["tokens"]) for m in report["measurements"]]
    assert phases == [("prefill", "selfextend", 40, 40), ("decode", "selfextend", 40, 3)]
    assert "warm-up: a 42-token prefill" in out.stderr
    assert report["peak_rss_bytes"] >= report["rss_after_load_bytes"] > 0


def test_bench_help_and_errors(tmp_path: Path) -> None:
    exe = bench_binary()
    help_text = subprocess.run([str(exe), "--help"], check=True, capture_output=True, text=True).stdout
    assert "(L - W) * G + W" in help_text
    bad = subprocess.run([str(exe), "--model", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def test_bench_backend_choice(model_path: Path) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bench_binary()), "--model", str(model_path), "--prefill", "30", "--decode-context", "0",
             "--repeats", "1", "--json", *extra],
            capture_output=True, text=True, timeout=300,
        )

    assert json.loads(run().stdout)["backend"] == "fused"
    report = json.loads(run("--backend", "tiled").stdout)
    assert report["backend"] == "tiled"
    # GPU memory is reported on CUDA devices only.
    assert report["gpu_memory_after_load_bytes"] is None and report["peak_gpu_memory_bytes"] is None
    bad = run("--backend", "flash")
    assert bad.returncode == 1 and "unknown attention backend 'flash'" in bad.stderr


def test_bench_machine_shares(model_path: Path) -> None:
    """`--machine`: the work per token follows the model's shapes (an f32 checkpoint: 2
    FLOPs per weight plus causal attention; decode reads every weight and the cache once),
    and the machine's peaks and the shares are reported."""
    out = subprocess.run(
        [str(bench_binary()), "--model", str(model_path), "--prefill", "40", "--decode-context", "40",
         "--decode-tokens", "4", "--attention", "vanilla", "--repeats", "1", "--machine", "--json"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(out.stdout)
    cfg = json.loads((model_path / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    d = h // heads
    weights = layers * (2 * h * heads * d + 2 * h * kv_heads * d + 3 * h * inter) + vocab * h
    prefill, decode = report["measurements"]
    assert prefill["linear_work_per_token"] == 2 * weights
    # Query i of 40 sees i + 1 keys: 20.5 on average; 4 FLOPs per key and head dimension.
    assert prefill["work_per_token"] == 2 * weights + 4 * heads * d * layers * 20.5
    assert report["kv_cache"] == "f32"
    assert decode["work_per_token"] == 4 * weights + layers * 2 * kv_heads * d * 4 * (40 + 2)
    machine = report["machine"]
    assert machine["threads"] >= 1
    assert machine["fma_peak_flops"] > 0 and machine["read_bytes_per_second"] > 0
    assert all(m["share_of_machine"] > 0 for m in report["measurements"])


def test_bench_attention_kernels(model_path: Path) -> None:
    """`--attention-kernels` times ours against candle's flash attention (after checking
    that they agree) instead of running the model."""
    out = subprocess.run(
        [str(bench_binary()), "--model", str(model_path), "--prefill", "48,96", "--repeats", "1",
         "--attention-kernels", "--json"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(out.stdout)
    assert report["measurements"] == []
    kernels = [(k["kernel"], k["length"]) for k in report["attention_kernels"]]
    names = ["ours, plain", "ours, SelfExtend", "candle flash_attn, plain"]
    assert kernels == [(name, n) for n in (48, 96) for name in names]
    assert all(k["median_seconds"] > 0 for k in report["attention_kernels"])
    bad = subprocess.run(
        [str(bench_binary()), "--model", str(model_path), "--prefill", "48", "--attention-kernels",
         "--backend", "naive"], capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1 and "--attention-kernels compares CPU kernels" in bad.stderr

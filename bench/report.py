"""Prints the Markdown tables of BENCHMARKS.md and draws docs/benchmarks.png from the
JSON that bench/run_benchmarks.sh writes.

    .venv/bin/pip install matplotlib   # plotting only; not a test or runtime dependency
    .venv/bin/python bench/report.py [bench-out] [docs/benchmarks.png]

Left: prefill time against prompt length, vanilla vs SelfExtend (and llama.cpp's
pp2048 where bench/compare_llamacpp.sh has run). Right: peak RSS of a prefill alone,
one process per point.

    .venv/bin/python bench/report.py --peers [bench-out] [docs/peers.png]

draws our speed as a ratio of llama.cpp's and PyTorch's from the
bench-out/compare-*.json that bench/compare_llamacpp.sh writes (one per prompt length,
and compare-avx2-*.json for its AVX2_ONLY=1 runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def print_tables(out_dir: Path) -> None:
    print("| phase | context | repeats | plain tok/s | SelfExtend tok/s | time ratio SE / plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in sorted(out_dir.glob("speed*.json"), key=lambda p: len(p.name)):
        report = json.loads(path.read_text())
        rows: dict[tuple[str, int], dict[str, dict]] = {}
        for m in report["measurements"]:
            rows.setdefault((m["phase"], m["context"]), {})[m["attention"]] = m
        for (phase, context), pair in rows.items():
            van, ext = pair["vanilla"], pair["selfextend"]
            print(f"| {phase} | {context} | {len(van['seconds'])} | {van['tokens_per_second']:.1f} "
                  f"| {ext['tokens_per_second']:.1f} | {ext['median_seconds'] / van['median_seconds']:.3f} |")
    print()
    print("| attention | prompt | prefill s | KV cache MiB | RSS after load MiB | peak RSS MiB | peak − KV − load MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    runs = [json.loads(p.read_text()) for p in out_dir.glob("rss-*.json")]
    loaded = out_dir / "load.json"
    after_load = json.loads(loaded.read_text())["rss_after_load_bytes"] if loaded.exists() else None
    for r in sorted(runs, key=lambda r: (r["measurements"][0]["attention"], r["measurements"][0]["context"])):
        (m,) = r["measurements"]
        load = r.get("rss_after_load_bytes") or after_load or 0
        extra = r["peak_rss_bytes"] - r["kv_cache_bytes"] - load
        print(f"| {m['attention']} | {m['context']} | {m['median_seconds']:.1f} | {mib(r['kv_cache_bytes'])} "
              f"| {mib(load) if load else '?'} | {mib(r['peak_rss_bytes'])} | {mib(extra) if load else '?'} |")
    print()


def plot_peers(out_dir: Path, png: Path) -> None:
    # AVX2_ONLY=1 runs (compare-avx2-*.json) after the others, labelled.
    runs = sorted((json.loads(p.read_text()) for p in out_dir.glob("compare-*.json")),
                  key=lambda r: (r.get("avx2_only", False), r["prompt"]))
    if not runs:
        sys.exit(f"no compare-*.json in {out_dir}: run bench/compare_llamacpp.sh first")
    labels, llama, torch = [], [], []
    for run in runs:
        for row in run["rows"]:
            if row["metric"].startswith(" "):
                continue  # our SelfExtend rows; the plot compares plain attention
            phase = "prefill" if row["metric"].startswith("prefill") else "decode"
            where = f"{run['prompt']} tokens" if phase == "prefill" else f"after {run['prompt']}"
            machine = run.get("machine") or {}
            isa = ("AVX2 only" if run.get("avx2_only")
                   else machine.get("int8_isa") or machine.get("isa") or "")
            cpu = run.get("cpu", "CPU not recorded")
            labels.append(f"{phase}\n{where}\n{cpu}\n{isa}")
            llama.append(row["ours"] / row["llama.cpp"])
            torch.append(row["ours"] / row["pytorch"] if row["pytorch"] else float("nan"))
            print(f"{labels[-1].replace(chr(10), ' '):<40} /llama.cpp {llama[-1]:5.2f}  "
                  f"/PyTorch {torch[-1]:5.2f}")
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(labels)), 4.6))
    ax.bar([x - 0.2 for x in xs], llama, 0.4, label="ours / llama.cpp")
    ax.bar([x + 0.2 for x in xs], torch, 0.4, label="ours / PyTorch (f32, sdpa)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("throughput ratio (> 1: we are faster)")
    threads = (runs[0].get("machine") or {}).get("threads", "?")
    note = ("; AVX2 only: AVX-512 turned off in all three on an AVX-512 CPU"
            if any(r.get("avx2_only") for r in runs) else "")
    ax.set_title(f"SmolLM2-135M Q4_1, plain attention, {threads} threads{note}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    if sys.argv[1:2] == ["--peers"]:
        plot_peers(Path(sys.argv[2] if len(sys.argv) > 2 else "bench-out"),
                   Path(sys.argv[3] if len(sys.argv) > 3 else "docs/peers.png"))
        return
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out")
    png = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks.png")
    print_tables(out_dir)
    prefill: dict[str, dict[int, float]] = {"vanilla": {}, "selfextend": {}}
    for path in sorted(out_dir.glob("speed*.json")):
        for m in json.loads(path.read_text())["measurements"]:
            if m["phase"] == "prefill":
                prefill[m["attention"]][m["context"]] = m["median_seconds"]
    rss: dict[str, dict[int, float]] = {"vanilla": {}, "selfextend": {}}
    kv: dict[int, float] = {}
    for path in sorted(out_dir.glob("rss-*.json")):
        report = json.loads(path.read_text())
        (m,) = report["measurements"]
        rss[m["attention"]][m["context"]] = report["peak_rss_bytes"] / 2**20
        kv[m["context"]] = report["kv_cache_bytes"] / 2**20
    loaded = out_dir / "load.json"
    after_load = json.loads(loaded.read_text())["rss_after_load_bytes"] / 2**20 if loaded.exists() else None

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"vanilla": ("o-", "plain attention"), "selfextend": ("s--", "SelfExtend")}
    for kind, (fmt, label) in style.items():
        xs = sorted(prefill[kind])
        ax_t.plot(xs, [prefill[kind][x] for x in xs], fmt, label=label)
        xs = sorted(rss[kind])
        ax_m.plot(xs, [rss[kind][x] for x in xs], fmt, label=label)
    if after_load is not None:
        xs = sorted(kv)
        ax_m.plot(xs, [after_load + kv[x] for x in xs], ":", color="grey",
                  label="RSS after load + KV cache")
    llama = Path("target/llamacpp/llamacpp-pp.json")
    if llama.exists():
        r = json.loads(llama.read_text())[0]
        ax_t.plot([r["n_prompt"]], [r["n_prompt"] / r["avg_ts"]], "k^", label="llama.cpp (pp)")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("prompt tokens")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    ax_t.set_ylabel("prefill time (s)")
    ax_t.set_title("Prefill time, SmolLM2-135M Q4_1, 2 threads")
    ax_m.set_ylabel("peak RSS (MiB)")
    ax_m.set_title("Peak RSS of one prefill")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

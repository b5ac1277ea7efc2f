"""Draws docs/benchmarks.png from the JSON that bench/run_benchmarks.sh writes.

    .venv/bin/pip install matplotlib   # plotting only; not a test or runtime dependency
    .venv/bin/python bench/plot.py [bench-out] [docs/benchmarks.png]

Left: prefill time against prompt length, vanilla vs SelfExtend (and llama.cpp's
pp2048 where bench/compare_llamacpp.sh has run). Right: peak RSS of a prefill alone,
one process per point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out")
    png = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks.png")
    prefill: dict[str, dict[int, float]] = {"vanilla": {}, "selfextend": {}}
    for path in sorted(out_dir.glob("speed*.json")):
        for m in json.loads(path.read_text())["measurements"]:
            if m["phase"] == "prefill":
                prefill[m["attention"]][m["context"]] = m["median_seconds"]
    rss: dict[str, dict[int, float]] = {"vanilla": {}, "selfextend": {}}
    for path in sorted(out_dir.glob("rss-*.json")):
        report = json.loads(path.read_text())
        (m,) = report["measurements"]
        rss[m["attention"]][m["context"]] = report["peak_rss_bytes"] / 2**20

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"vanilla": ("o-", "plain attention"), "selfextend": ("s--", "SelfExtend")}
    for kind, (fmt, label) in style.items():
        xs = sorted(prefill[kind])
        ax_t.plot(xs, [prefill[kind][x] for x in xs], fmt, label=label)
        xs = sorted(rss[kind])
        ax_m.plot(xs, [rss[kind][x] for x in xs], fmt, label=label)
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

"""Prints the README's long-context headline from the eval results:

    .venv/bin/python bench/eval_headline.py [docs/long-context]

one row per method: passkey accuracy (correct/prompts) and perplexity per length.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/long-context")
    passkey = json.loads((root / "passkey.json").read_text())
    ppl = json.loads((root / "ppl.json").read_text())
    p_lengths = sorted({r["length"] for r in passkey["records"]})
    q_lengths = sorted({r["length"] for r in ppl["records"]})
    k = lambda n: f"{n // 1024}k"  # noqa: E731
    head = (["method"] + [f"passkey {k(n)}" for n in p_lengths]
            + [f"PPL {k(n)}" for n in q_lengths])
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for m in dict.fromkeys(passkey["methods"] + ppl["methods"]):
        cells = []
        for n in p_lengths:
            got = [r["correct"] for r in passkey["records"] if r["method"] == m and r["length"] == n]
            cells.append(f"{sum(got)}/{len(got)}" if got else "–")
        for n in q_lengths:
            cell = ppl["summary"].get(m, {}).get(str(n))
            cells.append(f"{cell['ppl']:.1f}" if cell else "–")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

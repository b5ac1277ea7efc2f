"""Tables of the long-context results, from the eval's JSON:

    .venv/bin/python bench/eval_headline.py                 # print the headline
    .venv/bin/python bench/eval_headline.py --update README.md docs/long-context.md

The headline has one row per method: passkey accuracy (correct/prompts) and perplexity
per length. `--update` rewrites the blocks between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` in the given files, NAME being `headline`, `passkey`, `ppl` or
`sweep` (the last three are the eval's own Markdown, the sweep's from
`RESULTS/sweep/sweep.json` when it exists, whose heatmap `--update` also redraws).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from selfextend_rs import eval as se_eval


def headline(passkey: dict[str, Any], ppl: dict[str, Any], p_lengths: list[int],
             q_lengths: list[int]) -> str:
    """Cells for every length asked for, and any other length with records; "–" where
    nothing has run yet."""
    p_lengths = sorted(set(p_lengths) | {r["length"] for r in passkey["records"]})
    q_lengths = sorted(set(q_lengths) | {r["length"] for r in ppl["records"]})

    def k(n: int) -> str:
        return f"{n // 1024}k"

    head = (["method"] + [f"passkey {k(n)}" for n in p_lengths]
            + [f"PPL {k(n)}" for n in q_lengths])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in dict.fromkeys(passkey["methods"] + ppl["methods"]):
        cells = []
        for n in p_lengths:
            got = [r["correct"] for r in passkey["records"] if r["method"] == m and r["length"] == n]
            cells.append(f"{sum(got)}/{len(got)}" if got else "–")
        for n in q_lengths:
            cell = ppl["summary"].get(m, {}).get(str(n))
            cells.append(f"{cell['ppl']:.1f}" if cell else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="docs/long-context", help="the eval's --out")
    parser.add_argument("--update", nargs="*", default=None, metavar="FILE")
    parser.add_argument("--passkey-lengths", type=int, nargs="+",
                        default=[4096, 8192, 16384, 32768])
    parser.add_argument("--ppl-lengths", type=int, nargs="+",
                        default=[2048, 4096, 8192, 16384, 32768])
    args = parser.parse_args()
    root = Path(args.results)
    passkey = se_eval.load_result(root / "passkey.json")
    ppl = se_eval.load_result(root / "ppl.json")
    blocks = {"headline": headline(passkey, ppl, args.passkey_lengths, args.ppl_lengths),
              "passkey": se_eval.markdown(passkey),
              "ppl": se_eval.markdown(ppl)}
    sweep = root / "sweep" / "sweep.json"
    if sweep.exists():
        blocks["sweep"] = se_eval.markdown(se_eval.load_result(sweep))
    if args.update is None:
        print(blocks["headline"], end="")
        return
    if sweep.exists():
        # The sweep's own PNG is drawn when it finishes; the docs show it while it runs.
        se_eval.plot(se_eval.load_result(sweep), sweep.with_suffix(".png"))
    for name in args.update:
        path = Path(name)
        text = path.read_text()
        for block, body in blocks.items():
            text = re.sub(rf"(<!-- {block}:begin -->\n).*?(<!-- {block}:end -->)",
                          lambda m: m.group(1) + body + m.group(2), text, flags=re.S)
        path.write_text(text)


if __name__ == "__main__":
    main()

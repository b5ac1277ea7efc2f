"""Which group size G and neighbor window W for this model: a grid of SelfExtend settings
scored by passkey retrieval and perplexity on the same prompts and windows, and the
setting the measurements recommend. Public through `selfextend_rs.eval`.

A setting reaches (L - W)·G + W tokens for a model trained on L (the SelfExtend paper,
Jin et al., 2024); cells whose reach is below their longest sequence (a passkey prompt
and its answer) are out of reach and not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO, Union

import selfextend_rs as se
from selfextend_rs.eval import (
    Method,
    Record,
    Result,
    _answer_tokens,
    _k,
    _passkey_record,
    _ppl_records,
    _Progress,
    _recorded,
    _start,
    _summarize,
    _text_name,
    parse_method,
    passkey_case,
    ppl_windows,
    wilson_interval,
)

DEFAULT_GROUP_SIZES = (2, 4, 8, 16, 32)
DEFAULT_REFERENCES = ("plain", "selfextend:auto")


def default_windows(trained: int) -> list[int]:
    """L/16, L/8, L/4 (the paper's and `SelfExtend.auto`'s choice) and L/2, as multiples
    of 64 when L allows."""
    out = []
    for div in (16, 8, 4, 2):
        w = trained // div
        out.append(w // 64 * 64 if w >= 64 else max(1, w))
    return sorted(set(out))


def _grid_method(group_size: int, window: int) -> Method:
    return parse_method(f"selfextend:{group_size},{window}")


def in_reach(group_size: int, window: int, length: int, trained: int, digits: int) -> bool:
    """Whether SelfExtend(G, W) keeps every sequence of a `length` cell inside the
    positions the model was trained on: its passkey prompts (within length / 200 of
    it, see `passkey_prompt`) with their answers of digits + 4 tokens."""
    longest = length + max(1, length // 200) + _answer_tokens(digits)
    return window < trained and se.SelfExtend(group_size, window).max_context(trained) >= longest


@dataclass(frozen=True)
class SweepCell:
    """What the sweep measured for one method at one length."""

    method: str
    length: int
    #: The setting run: `SelfExtend.auto`'s choice for this length for "selfextend:auto",
    #: None for plain attention.
    self_extend: Optional[se.SelfExtend]
    correct: int
    prompts: int
    #: Pooled perplexity over `windows` text windows; None before any has run.
    ppl: Optional[float]
    windows: int

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.prompts if self.prompts else None

    @property
    def interval(self) -> Optional[tuple[float, float]]:
        """The 95% Wilson interval of the passkey accuracy."""
        return wilson_interval(self.correct, self.prompts) if self.prompts else None

    def describe(self) -> str:
        parts = []
        if self.prompts:
            lo, hi = wilson_interval(self.correct, self.prompts)
            parts.append(f"passkey {self.correct}/{self.prompts} "
                         f"(95% interval {100 * lo:.0f}–{100 * hi:.0f}%)")
        if self.ppl is not None:
            parts.append(f"perplexity {self.ppl:.2f} ({self.windows} "
                         f"window{'s' if self.windows != 1 else ''})")
        return ", ".join(parts) or "not run yet"


@dataclass(frozen=True)
class Recommendation:
    """The grid setting whose passkey accuracy over `lengths` (pooled) has the highest
    lower end of its 95% interval (with equal sample counts: the highest accuracy), ties
    broken by the lower mean log-perplexity, then the smaller G and the larger W."""

    self_extend: se.SelfExtend
    lengths: tuple[int, ...]
    #: The recommended setting's cell at each length.
    evidence: tuple[SweepCell, ...]
    #: Other grid settings whose pooled 95% passkey interval overlaps the recommended
    #: one's: these samples do not tell them apart on retrieval.
    not_separated: tuple[se.SelfExtend, ...]
    #: Settings that were candidates (in reach at every length, with passkey records).
    candidates: int

    def __str__(self) -> str:
        s = self.self_extend
        where = " and ".join(f"{n} tokens" for n in self.lengths)
        lines = [f"Recommended for {where}: SelfExtend({s.group_size}, {s.window})"]
        for cell in self.evidence:
            lines.append(f"  at {cell.length}: {cell.describe()}")
        if self.not_separated:
            listed = ", ".join(f"({o.group_size}, {o.window})" for o in self.not_separated)
            lines.append(f"  {len(self.not_separated)} of the other {self.candidates - 1} "
                         f"settings are not told apart from it on passkey by these samples "
                         f"(their 95% intervals overlap): {listed}")
        elif self.candidates == 1:
            lines.append("  the only setting in reach with passkey records so far")
        else:
            lines.append(f"  its passkey interval does not overlap any of the other "
                         f"{self.candidates - 1} settings'")
        return "\n".join(lines)


def run_sweep(
    model: se.Model,
    *,
    lengths: Sequence[int],
    group_sizes: Optional[Sequence[int]] = None,
    windows: Optional[Sequence[int]] = None,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 1,
    text_windows: int = 2,
    last: int = 256,
    digits: int = 5,
    seed: int = 0,
    references: Sequence[str] = DEFAULT_REFERENCES,
    documents: Optional[Sequence[tuple[str, str]]] = None,
    chunk_size: Optional[int] = None,
    progress: Union[bool, TextIO] = True,
    resume: Optional[Result] = None,
    on_record: Optional[Callable[[Result], None]] = None,
) -> Result:
    """Scores every SelfExtend(G, W) of `group_sizes` x `windows` in reach at each length
    by passkey retrieval (`depths` x `samples` prompts) and perplexity (`text_windows`
    windows, last `last` tokens), plus the `references` methods (plain attention and
    `SelfExtend.auto` by default) on the same prompts and windows.

    Defaults: G in 2, 4, 8, 16, 32 and W from `default_windows(L)`. Lengths run from the
    shortest; within a length, round k gives every cell its k-th prompt (and window),
    the depths spread out (middle, ends, quarters), so an interrupted sweep has an even
    grid that covers the prompt. `resume` and `on_record` work as in
    `run_passkey`. The result's "recommendation" holds the choice for each length and
    for all of them together (see `recommend`).
    """
    trained = model.config.trained_context
    groups = sorted(set(int(g) for g in (DEFAULT_GROUP_SIZES if group_sizes is None
                                         else group_sizes)))
    wins = sorted(set(int(w) for w in (default_windows(trained) if windows is None
                                       else windows)))
    if not groups or min(groups) < 1 or not wins or min(wins) < 1:
        raise ValueError("group sizes and windows must be integers >= 1")
    if min(wins) >= trained:
        raise ValueError(f"every window is >= the trained context {trained}: SelfExtend "
                         "would be plain attention")
    if samples < 1 or digits < 1 or text_windows < 0 or not depths or not lengths:
        raise ValueError("need samples >= 1, digits >= 1, text_windows >= 0, and at least "
                         "one length and depth")
    refs = [parse_method(r) for r in references]
    config: dict[str, Any] = {
        "lengths": sorted(set(int(n) for n in lengths)), "group_sizes": groups,
        "windows": wins, "depths": sorted(set(float(d) for d in depths)), "samples": samples,
        "text_windows": text_windows, "last": last, "digits": digits, "seed": seed,
        "references": [m.spec for m in refs], "chunk_size": chunk_size,
        "text": _text_name(documents),
    }
    if text_windows and not 1 <= last < config["lengths"][0]:
        raise ValueError(f"last must be >= 1 and below every length, got {last}")
    for n in config["lengths"]:
        if not any(in_reach(g, w, n, trained, digits) for g in groups for w in wins):
            best = max(se.SelfExtend(g, w).max_context(trained) for g in groups for w in wins
                       if w < trained)
            raise ValueError(f"no setting of the grid reaches {n} tokens (a passkey prompt and "
                             f"its answer) on a model trained on {trained}: the farthest "
                             f"reaches {best}; add larger group sizes or smaller windows")
    grid = {(g, w): _grid_method(g, w) for w in wins for g in groups}
    refs = [m for m in refs if m not in grid.values()]
    result = _start("sweep", model, config, refs + list(grid.values()), resume)
    done = {_record_key(r) for r in result["records"]}
    max_new = _answer_tokens(digits)
    prompts_per_cell = [(d, s) for s in range(samples) for d in _spread(config["depths"])]
    texts = (ppl_windows(model.tokenizer, config["lengths"][-1], text_windows, seed, documents)
             if text_windows else [])

    # (length, kind, index, method): kind "passkey" indexes prompts_per_cell, "ppl" texts.
    jobs: list[tuple[int, str, int, Method]] = []
    for n in config["lengths"]:
        cells = refs + [m for (g, w), m in grid.items() if in_reach(g, w, n, trained, digits)]
        for k in range(max(len(prompts_per_cell), text_windows)):
            for kind, count in (("passkey", len(prompts_per_cell)), ("ppl", text_windows)):
                if k < count:
                    jobs += [(n, kind, k, m) for m in cells]
    todo = [j for j in jobs if _job_key(j, prompts_per_cell) not in done]
    # Built before anything runs, so that a length too short for a prompt fails at once.
    prompts = {(n, k): passkey_case(model.tokenizer, n, d, sample=s, seed=seed, digits=digits)
               for n in config["lengths"] for k, (d, s) in enumerate(prompts_per_cell)}
    bar = _Progress("sweep", [n for n, _, _, _ in todo], progress)
    for n, kind, k, method in todo:
        if kind == "passkey":
            depth, sample = prompts_per_cell[k]
            bar.begin(f"{method.spec} {_k(n)} passkey depth {depth:g}")
            record = _passkey_record(model, prompts[(n, k)], method, n, depth, sample, max_new,
                                     chunk_size, bar)
            result["records"].append({"task": "passkey", **record})
        else:
            bar.begin(f"{method.spec} {_k(n)} ppl window {k}")
            records = _ppl_records(model, texts[k], k, method, [n], last, chunk_size, bar)
            result["records"] += [{"task": "ppl", **r} for r in records]
        _recorded(result, bar, on_record)
    bar.close()
    _summarize(result)
    return result


def _spread(depths: list[float]) -> list[float]:
    """`depths` in the order an interrupted sweep learns most from: the middle one,
    then each time the one farthest from those already taken (0.5, 0, 1, 0.25, 0.75)."""
    rest = sorted(depths)
    order = [rest.pop((len(rest) - 1) // 2)]
    while rest:
        far = max(rest, key=lambda d: (min(abs(d - o) for o in order), -d))
        order.append(far)
        rest.remove(far)
    return order


def _record_key(r: Record) -> tuple[Any, ...]:
    if r["task"] == "passkey":
        return ("passkey", r["method"], r["length"], r["depth"], r["sample"])
    return ("ppl", r["method"], r["length"], r["window"])


def _job_key(job: tuple[int, str, int, Method], prompts: list[tuple[float, int]]) -> tuple[Any, ...]:
    n, kind, k, method = job
    if kind == "passkey":
        return ("passkey", method.spec, n, *prompts[k])
    return ("ppl", method.spec, n, k)


def summarize(result: Result) -> dict[str, Any]:
    """The sweep's summary: per method and length, passkey counts and pooled
    perplexity; and the recommendations (JSON-ready)."""
    cells: dict[str, dict[str, Any]] = {}
    for r in result["records"]:
        c = cells.setdefault(r["method"], {}).setdefault(str(r["length"]), {
            "correct": 0, "prompts": 0, "nll": [], "self_extend": r["self_extend"]})
        if r["task"] == "passkey":
            c["correct"] += int(r["correct"])
            c["prompts"] += 1
        else:
            c["nll"].append(r["nll"])
    for by_length in cells.values():
        for c in by_length.values():
            nll = c.pop("nll")
            c["windows"] = len(nll)
            c["ppl"] = math.exp(math.fsum(nll) / len(nll)) if nll else None
    summary: dict[str, Any] = {"cells": cells, "recommendation": {}}
    result["summary"] = summary
    for key, chosen in [(str(n), recommend(result, [n])) for n in result["config"]["lengths"]] + [
            ("all", recommend(result))]:
        if chosen is not None:
            summary["recommendation"][key] = {
                "self_extend": [chosen.self_extend.group_size, chosen.self_extend.window],
                "not_separated": [[o.group_size, o.window] for o in chosen.not_separated],
                "candidates": chosen.candidates,
            }
    return summary


def cell(result: Result, method: str, length: int) -> SweepCell:
    """What the sweep has for `method` (e.g. "selfextend:8,1024", "plain") at `length`."""
    c = result["summary"]["cells"].get(method, {}).get(str(length))
    if c is None:
        return SweepCell(method, length, None, 0, 0, None, 0)
    s = c["self_extend"]
    return SweepCell(method, length, None if s is None else se.SelfExtend(*s), c["correct"],
                     c["prompts"], c["ppl"], c["windows"])


def recommend(result: Result, lengths: Optional[Sequence[int]] = None) -> Optional[Recommendation]:
    """The grid setting the sweep recommends for `lengths` (default: every length swept,
    which only settings in reach at all of them can be), or None before any candidate
    has a passkey record at each of those lengths.

    Passkey accuracy decides, pooled over the lengths, by the lower end of its 95%
    Wilson interval: with equal sample counts that is the accuracy itself, and while a
    sweep is partial, 2/2 ranks above 1/1. Then the mean log-perplexity over the lengths,
    each on the text windows every candidate has run (the same text for all); then the
    smaller G, then the larger W.
    """
    c = result["config"]
    trained = result["model"]["trained_context"]
    want = tuple(sorted(set(int(n) for n in (lengths or c["lengths"]))))
    # Per (method, length): the log-perplexity of each text window run.
    windows: dict[tuple[str, int], dict[int, float]] = {}
    for r in result["records"]:
        if r["task"] == "ppl":
            windows.setdefault((r["method"], r["length"]), {})[r["window"]] = r["nll"]
    candidates = []
    for w in c["windows"]:
        for g in c["group_sizes"]:
            if not all(in_reach(g, w, n, trained, c["digits"]) for n in want):
                continue
            cells = [cell(result, f"selfextend:{g},{w}", n) for n in want]
            if all(x.prompts for x in cells):
                candidates.append(((g, w), cells))
    # Perplexity is compared on the windows every candidate has, the same text for all.
    common = {n: set.intersection(*(set(windows.get((f"selfextend:{g},{w}", n), {}))
                                    for (g, w), _ in candidates)) if candidates else set()
              for n in want}
    ranked = []
    for (g, w), cells in candidates:
        correct, prompts = sum(x.correct for x in cells), sum(x.prompts for x in cells)
        mine = [[windows[(f"selfextend:{g},{w}", n)][k] for k in common[n]] for n in want]
        nll = [math.fsum(v) / len(v) for v in mine if v]
        mean_nll = math.fsum(nll) / len(nll) if nll else math.inf
        lower = wilson_interval(correct, prompts)[0]
        ranked.append(((-lower, mean_nll, g, -w), (g, w), cells, (correct, prompts)))
    if not ranked:
        return None
    ranked.sort(key=lambda x: x[0])
    _, (g, w), cells, (correct, prompts) = ranked[0]
    lo, _ = wilson_interval(correct, prompts)
    others = [se.SelfExtend(*setting) for _, setting, _, (k, m) in ranked[1:]
              if wilson_interval(k, m)[1] >= lo]
    return Recommendation(se.SelfExtend(g, w), want, tuple(cells), tuple(others), len(ranked))


def markdown(result: Result) -> str:
    """Per length: the recommendation, then passkey and perplexity by W (rows) and G
    (columns), then the reference methods."""
    c = result["config"]
    trained = result["model"]["trained_context"]
    ppl = (f"the perplexity of the last {c['last']} tokens of {c['text_windows']} text "
           f"window(s) ({c['text']})" if c["text_windows"] else "no perplexity")
    out = [f"SelfExtend sweep (trained context L = {trained}): passkey retrieval "
           f"({len(c['depths'])} depths x {c['samples']} sample(s), {c['digits']}-digit keys) "
           f"and {ppl} per cell. A cell reads `correct/prompts (95% Wilson interval) · "
           "perplexity`; settings whose intervals overlap are not told apart by these "
           "samples. \"out of reach\": (L − W)·G + W is below the cell's longest sequence "
           "(a passkey prompt and its answer).\n"]
    for n in c["lengths"]:
        out.append(f"\n### {n} tokens\n")
        chosen = recommend(result, [n])
        out.append(str(chosen).replace("\n  ", "\n- ") if chosen
                   else "No recommendation yet: no setting in reach has a passkey record.")
        out.append("\n| W \\ G | " + " | ".join(str(g) for g in c["group_sizes"]) + " |")
        out.append("|---:|" + "---:|" * len(c["group_sizes"]))
        for w in c["windows"]:
            row = []
            for g in c["group_sizes"]:
                if not in_reach(g, w, n, trained, c["digits"]):
                    row.append("out of reach")
                    continue
                text = _cell_text(cell(result, f"selfextend:{g},{w}", n))
                mark = chosen is not None and (g, w) == (chosen.self_extend.group_size,
                                                         chosen.self_extend.window)
                row.append(f"**{text}**" if mark else text)
            out.append(f"| {w} | " + " | ".join(row) + " |")
        for ref in c["references"]:
            x = cell(result, ref, n)
            setting = (f" = SelfExtend({x.self_extend.group_size}, {x.self_extend.window})"
                       if ref == "selfextend:auto" and x.self_extend else "")
            out.append(f"\n{ref}{setting}: {x.describe()}")
        out.append("")
    if len(c["lengths"]) > 1:
        overall = recommend(result)
        out.append("\n### One setting for every length\n")
        out.append(str(overall).replace("\n  ", "\n- ") if overall else
                   "No setting has passkey records at every length yet.")
    return "\n".join(out) + "\n"


def _cell_text(x: SweepCell) -> str:
    if not x.prompts and x.ppl is None:
        return "–"
    parts = []
    if x.prompts:
        lo, hi = wilson_interval(x.correct, x.prompts)
        parts.append(f"{x.correct}/{x.prompts} ({100 * lo:.0f}–{100 * hi:.0f}%)")
    if x.ppl is not None:
        parts.append(f"{x.ppl:.1f}")
    return " · ".join(parts)


def plot(result: Result, path: Union[str, Path]) -> Path:
    """Heatmaps, one column per length: passkey accuracy (top) and perplexity (bottom)
    over W (rows) x G (columns); the recommended cell is outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    c = result["config"]
    trained = result["model"]["trained_context"]
    lengths, groups, wins = c["lengths"], c["group_sizes"], c["windows"]
    fig, axes = plt.subplots(2, len(lengths), squeeze=False, constrained_layout=True,
                             figsize=(1.1 * len(groups) * len(lengths) + 2, 1.0 * len(wins) * 2 + 2))
    # The colour scale spans the grid's cells only: plain attention's perplexity past L
    # (hundreds or thousands) would squeeze them into one colour.
    ppls = [x["ppl"] for m, by in result["summary"]["cells"].items() if m not in c["references"]
            for x in by.values() if x["ppl"] is not None]
    norm = LogNorm(min(ppls), max(ppls) * 1.001) if ppls else None
    # Cells with nothing to show (out of reach, not run yet) are grey.
    acc_map = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    ppl_map = matplotlib.colormaps["viridis_r"].with_extremes(bad="#dddddd")
    for j, n in enumerate(lengths):
        chosen = recommend(result, [n])
        acc = [[math.nan] * len(groups) for _ in wins]
        ppl = [[math.nan] * len(groups) for _ in wins]
        labels: list[tuple[int, int, str, str]] = []
        for i, w in enumerate(wins):
            for k, g in enumerate(groups):
                if not in_reach(g, w, n, trained, c["digits"]):
                    labels.append((i, k, "out of\nreach", "out of\nreach"))
                    continue
                x = cell(result, f"selfextend:{g},{w}", n)
                if x.prompts:
                    acc[i][k] = x.correct / x.prompts
                if x.ppl is not None:
                    ppl[i][k] = x.ppl
                labels.append((i, k, f"{x.correct}/{x.prompts}" if x.prompts else "–",
                               f"{x.ppl:.1f}" if x.ppl is not None else "–"))
        top, bottom = axes[0][j], axes[1][j]
        im_acc = top.imshow(acc, cmap=acc_map, vmin=0, vmax=1, aspect="auto")
        im_ppl = bottom.imshow(ppl, cmap=ppl_map, norm=norm, aspect="auto")
        for i, k, a, p in labels:
            top.text(k, i, a, ha="center", va="center", fontsize=7)
            # Dark text on the light (low-perplexity) end of the colour map.
            dark = norm is None or math.isnan(ppl[i][k]) or norm(ppl[i][k]) < 0.5
            bottom.text(k, i, p, ha="center", va="center", fontsize=7,
                        color="black" if dark else "white")
        for ax, title in ((top, f"passkey, {_k(n)} tokens"), (bottom, f"perplexity, {_k(n)} tokens")):
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(len(groups)), [str(g) for g in groups])
            ax.set_yticks(range(len(wins)), [str(w) for w in wins])
            ax.set_xlabel("group size G")
            if j == 0:
                ax.set_ylabel("window W")
            if chosen is not None:
                i = wins.index(chosen.self_extend.window)
                k = groups.index(chosen.self_extend.group_size)
                ax.add_patch(Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
    fig.colorbar(im_acc, ax=list(axes[0]), shrink=0.8, label="passkey accuracy")
    if norm is not None:
        fig.colorbar(im_ppl, ax=list(axes[1]), shrink=0.8, label="perplexity")
    fig.suptitle(f"SelfExtend sweep: {Path(result['model']['path']).name} "
                 f"(trained context {trained}); outlined: recommended")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

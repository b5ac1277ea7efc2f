"""The G x W sweep (`selfextend_rs.eval.run_sweep`, `selfextend-rs eval sweep`): its grid,
resuming, output files and recommendation, each checked against a computation written
out here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny_models import CORPUS

import selfextend_rs as se
from selfextend_rs import eval as se_eval

DOCS = [(f"doc{i}", " ".join(CORPUS[i % 7:] + CORPUS[:i % 7]) * 8) for i in range(3)]
# The tiny model's trained context is 32: every setting below is SelfExtend past it.
GRID: dict[str, Any] = dict(lengths=[300, 500], group_sizes=[8, 16, 32], windows=[4, 8, 16],
                            depths=[0.0, 1.0], text_windows=2, last=32, documents=DOCS,
                            progress=False)


def reachable(g: int, w: int, n: int, trained: int) -> bool:
    # The longest sequence of a cell: a prompt up to n / 200 longer than n, and the
    # answer's 5 digits + 4 tokens.
    return w < trained and (trained - w) * g + w >= n + max(1, n // 200) + 9


@pytest.fixture(scope="module")
def sweep(model: se.Model) -> dict[str, Any]:
    return se_eval.run_sweep(model, **GRID)


def test_sweep_runs_every_cell_in_reach_on_shared_prompts(model: se.Model,
                                                          sweep: dict[str, Any]) -> None:
    trained = model.config.trained_context
    assert trained == 32
    records = sweep["records"]
    for n in GRID["lengths"]:
        expected = {"plain", "selfextend:auto"} | {
            f"selfextend:{g},{w}" for g in GRID["group_sizes"] for w in GRID["windows"]
            if reachable(g, w, n, trained)}
        for task, per_cell in (("passkey", 2), ("ppl", 2)):
            got = [r["method"] for r in records if r["length"] == n and r["task"] == task]
            assert sorted(got) == sorted(m for m in expected for _ in range(per_cell)), (n, task)
    # At 300 tokens: (32 - W) G + W >= 300 holds for G = 16 with W = 4, 8 and for G = 32.
    assert {r["method"] for r in records if r["length"] == 300} >= {"selfextend:16,8",
                                                                     "selfextend:32,16"}
    assert "selfextend:16,16" not in {r["method"] for r in records if r["length"] == 300}
    # Every method sees the same key at a (length, depth) and the same text window.
    for n in GRID["lengths"]:
        for d in GRID["depths"]:
            keys = {r["key"] for r in records if r["task"] == "passkey" and r["length"] == n
                    and r["depth"] == d}
            assert len(keys) == 1
    # A record is the passkey task's own: the same prompt and answer as `run_passkey`.
    alone = se_eval.run_passkey(model, lengths=[300], depths=[1.0],
                                methods=["selfextend:16,8"], progress=False)["records"][0]
    mine = next(r for r in records if r["task"] == "passkey" and r["length"] == 300
                and r["depth"] == 1.0 and r["method"] == "selfextend:16,8")
    assert {k: mine[k] for k in ("key", "answer", "correct", "prompt_tokens")} == \
        {k: alone[k] for k in ("key", "answer", "correct", "prompt_tokens")}
    # Perplexity records score the same tokens as `run_perplexity`.
    ppl = se_eval.run_perplexity(model, lengths=[500], windows=1, last=32, documents=DOCS,
                                 methods=["selfextend:32,4"], progress=False)["records"][0]
    mine = next(r for r in records if r["task"] == "ppl" and r["length"] == 500
                and r["window"] == 0 and r["method"] == "selfextend:32,4")
    assert mine["nll"] == pytest.approx(ppl["nll"], rel=1e-6)
    # The auto row runs SelfExtend.auto for the whole sequence: prompt and answer, or window.
    for r in records:
        if r["method"] == "selfextend:auto":
            n = r["prompt_tokens"] + 9 if r["task"] == "passkey" else r["length"]
            auto = se.SelfExtend.auto(n, trained)
            assert r["self_extend"] == [auto.group_size, auto.window]


def ranked_by_hand(result: dict[str, Any], lengths: list[int]) -> list[tuple[int, int]]:
    """The recommendation rule written out: the lower end of the pooled passkey
    accuracy's 95% interval, then the mean over lengths of log perplexity, then smaller
    G, then larger W."""
    trained = result["model"]["trained_context"]
    rows = []
    for g in result["config"]["group_sizes"]:
        for w in result["config"]["windows"]:
            if not all(reachable(g, w, n, trained) for n in lengths):
                continue
            mine = [r for r in result["records"] if r["method"] == f"selfextend:{g},{w}"
                    and r["length"] in lengths]
            keys = [r for r in mine if r["task"] == "passkey"]
            acc = se_eval.wilson_interval(sum(r["correct"] for r in keys), len(keys))[0]
            mean_log_ppl = sum(
                sum(r["nll"] for r in mine if r["task"] == "ppl" and r["length"] == n)
                / sum(1 for r in mine if r["task"] == "ppl" and r["length"] == n)
                for n in lengths) / len(lengths)
            rows.append((-acc, round(mean_log_ppl, 9), g, -w))
    return [(g, -w) for _, _, g, w in sorted(rows)]


def test_recommendation_follows_its_rule(sweep: dict[str, Any]) -> None:
    for lengths in ([300], [500], [300, 500]):
        order = ranked_by_hand(sweep, lengths)
        chosen = se_eval.recommend(sweep, lengths)
        assert chosen is not None
        assert (chosen.self_extend.group_size, chosen.self_extend.window) == order[0]
        assert chosen.candidates == len(order)
        assert [c.length for c in chosen.evidence] == lengths
    overall = se_eval.recommend(sweep)
    assert overall is not None and overall.lengths == (300, 500)
    saved = sweep["summary"]["recommendation"]
    assert saved["all"]["self_extend"] == [overall.self_extend.group_size,
                                           overall.self_extend.window]
    assert set(saved) == {"300", "500", "all"}


def synthetic(cells: dict[tuple[int, int], tuple[int, int, float]]) -> dict[str, Any]:
    """A sweep result at one length (4096, trained context 2048) made of the given cells:
    (G, W) -> (correct, prompts, perplexity)."""
    records: list[dict[str, Any]] = []
    for (g, w), (correct, prompts, ppl) in cells.items():
        m = f"selfextend:{g},{w}"
        records += [{"task": "passkey", "method": m, "length": 4096, "correct": i < correct,
                     "self_extend": [g, w]} for i in range(prompts)]
        records.append({"task": "ppl", "method": m, "length": 4096, "window": 0,
                        "nll": math.log(ppl), "self_extend": [g, w]})
    result = {"task": "sweep", "model": {"trained_context": 2048, "path": "m.gguf"},
              "config": {"lengths": [4096], "group_sizes": sorted({g for g, _ in cells}),
                         "windows": sorted({w for _, w in cells}), "depths": [0.5],
                         "samples": 5, "text_windows": 1, "last": 8, "digits": 5,
                         "text": "t", "references": []},
              "records": records, "summary": {}}
    se_eval._summarize(result)
    return result


def test_recommendation_on_known_counts() -> None:
    # 5/5 (interval 57-100%) beats 4/5 (38-99%) on accuracy although 4/5 has the lower
    # perplexity; 4/5 overlaps it and is listed, 0/5 (0-43%) does not and is not.
    result = synthetic({(4, 512): (5, 5, 30.0), (8, 512): (4, 5, 20.0), (16, 512): (0, 5, 10.0)})
    chosen = se_eval.recommend(result)
    assert chosen is not None and chosen.self_extend == se.SelfExtend(4, 512)
    assert chosen.not_separated == (se.SelfExtend(8, 512),) and chosen.candidates == 3
    text = str(chosen)
    assert "SelfExtend(4, 512)" in text and "passkey 5/5 (95% interval 57–100%)" in text
    assert "perplexity 30.00" in text and "(8, 512)" in text and "(16, 512)" not in text
    # Equal accuracy: the lower perplexity wins; equal both: the smaller G, then larger W.
    assert se_eval.recommend(synthetic({(4, 512): (3, 5, 30.0), (8, 512): (3, 5, 25.0)})
                             ).self_extend == se.SelfExtend(8, 512)  # type: ignore[union-attr]
    alone = se_eval.recommend(synthetic({(4, 512): (1, 5, 30.0)}))
    assert alone is not None and "the only setting in reach" in str(alone)
    # Perplexity compares the windows both have: window 1 (here 5.0) is another text.
    extra = synthetic({(4, 512): (3, 5, 30.0), (8, 512): (3, 5, 25.0)})
    extra["records"].append({"task": "ppl", "method": "selfextend:4,512", "length": 4096,
                             "window": 1, "nll": math.log(5.0), "self_extend": [4, 512]})
    se_eval._summarize(extra)
    assert se_eval.recommend(extra).self_extend == se.SelfExtend(8, 512)  # type: ignore[union-attr]
    # A partial sweep: 2/2 has more evidence than 1/1, whatever the perplexity.
    partial = synthetic({(4, 512): (1, 1, 10.0), (8, 512): (2, 2, 30.0)})
    assert se_eval.recommend(partial).self_extend == se.SelfExtend(8, 512)  # type: ignore[union-attr]
    tie = synthetic({(8, 512): (3, 5, 25.0), (4, 512): (3, 5, 25.0), (4, 1024): (3, 5, 25.0)})
    assert se_eval.recommend(tie).self_extend == se.SelfExtend(4, 1024)  # type: ignore[union-attr]
    table = se_eval.markdown(result)
    assert "**5/5 (57–100%) · 30.0**" in table and "| 512 |" in table
    assert "| out of reach" not in table


def test_sweep_resumes_where_it_stopped(model: se.Model, sweep: dict[str, Any]) -> None:
    saved: list[dict[str, Any]] = []

    def stop_after_five(result: dict[str, Any]) -> None:
        saved.append(json.loads(json.dumps(result)))
        if len(saved) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        se_eval.run_sweep(model, on_record=stop_after_five, **GRID)
    partial = saved[-1]
    # Round 0 comes first: the five records are the first prompt of five cells at 300.
    assert {(r["length"], r["depth"]) for r in partial["records"]} == {(300, 0.0)}
    runs: list[int] = []
    resumed = se_eval.run_sweep(model, resume=partial,
                                on_record=lambda r: runs.append(len(r["records"])), **GRID)
    assert len(runs) == len(sweep["records"]) - 5
    assert resumed["records"][:5] == partial["records"]

    def strip(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(sorted((k, v) for k, v in r.items() if k not in ("seconds", "sources")))

    assert sorted(map(strip, resumed["records"])) == sorted(map(strip, sweep["records"]))
    with pytest.raises(ValueError, match="digits"):
        se_eval.run_sweep(model, resume=partial, **dict(GRID, digits=6))
    # Perplexity settings matter only to perplexity records: passkey ones carry over.
    keys_only = json.loads(json.dumps(partial))
    keys_only["records"] = [r for r in keys_only["records"] if r["task"] == "passkey"]
    kept = se_eval.run_sweep(model, resume=keys_only, **dict(GRID, last=16, text_windows=0))
    assert kept["records"][:len(keys_only["records"])] == keys_only["records"]
    with_ppl = json.loads(json.dumps(sweep))
    with pytest.raises(ValueError, match="last was 32, now 16"):
        se_eval.run_sweep(model, resume=with_ppl, **dict(GRID, last=16))
    with pytest.raises(ValueError, match="cannot resume from the saved passkey run"):
        se_eval.run_sweep(model, resume=se_eval.run_passkey(
            model, lengths=[300], depths=[0.0], methods=["plain"], progress=False), **GRID)


def test_sweep_rejects_bad_grids(model: se.Model) -> None:
    for bad, match in [(dict(group_sizes=[0]), ">= 1"), (dict(group_sizes=[]), ">= 1"),
                       (dict(windows=[32, 64]), "trained context"),
                       (dict(samples=0), "samples"), (dict(lengths=[40]), "too short"),
                       (dict(last=300), "last"), (dict(last=0), "last must be >= 1"),
                       (dict(group_sizes=[2, 4]), "no setting of the grid reaches 300 tokens")]:
        with pytest.raises(ValueError, match=match):
            se_eval.run_sweep(model, **dict(GRID, **bad))


def test_an_interrupted_sweep_covers_the_depths() -> None:
    from selfextend_rs.eval._sweep import _spread

    assert _spread([0.0, 0.25, 0.5, 0.75, 1.0]) == [0.5, 0.0, 1.0, 0.25, 0.75]
    assert _spread([1.0, 0.0]) == [0.0, 1.0] and _spread([0.3]) == [0.3]


def test_default_grid_comes_from_the_trained_context() -> None:
    assert se_eval.default_windows(8192) == [512, 1024, 2048, 4096]
    assert se_eval.default_windows(32) == [2, 4, 8, 16]
    assert se_eval.DEFAULT_GROUP_SIZES == (2, 4, 8, 16, 32)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "selfextend_rs.cli", "eval", *args],
                          capture_output=True, text=True, timeout=600)


def test_cli_sweep_end_to_end(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(model_path), "--lengths", "300", "--group-sizes", "16", "32",
            "--neighbor-windows", "4", "8", "--depths", "0", "1", "--text-windows", "1",
            "--last", "32", "--out", str(out)]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "sweep.json").read_text())
    # 4 settings in reach and the 2 references, 2 prompts and 1 window each.
    assert len(data["records"]) == 6 * 3
    chosen = se_eval.recommend(data)
    assert chosen is not None
    g, w = chosen.self_extend.group_size, chosen.self_extend.window
    assert f"Use it: SelfExtend({g}, {w}) in Python, or --group-size {g} --window {w}" in done.stdout
    assert (out / "sweep.md").read_text().startswith("SelfExtend sweep")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli(*args, "--group-sizes", "16", "32", "64", "--resume")
    assert again.returncode == 0, again.stderr
    more = json.loads((out / "sweep.json").read_text())
    assert more["records"][:18] == data["records"] and len(more["records"]) == 18 + 2 * 3
    bad = run_cli("sweep", "--model", str(model_path), "--group-sizes", "0", "--out", str(out))
    assert bad.returncode == 2 and "group sizes and windows must be integers >= 1" in bad.stderr
    missing = run_cli("sweep", "--model", str(model_path), "--text", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and "cannot read --text" in missing.stderr
    # Perplexity on the user's own text.
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(CORPUS) * 40)
    own = run_cli(*args[:-2], "--text", str(doc), "--out", str(tmp_path / "own"), "--no-plot")
    assert own.returncode == 0, own.stderr
    assert json.loads((tmp_path / "own" / "sweep.json").read_text())["config"]["text"] == f"custom: {doc}"
    helped = run_cli("sweep", "--help")
    assert helped.returncode == 0 and "--neighbor-windows" in helped.stdout

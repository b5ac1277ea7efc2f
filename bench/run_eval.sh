#!/usr/bin/env bash
# The long-context evaluation behind docs/long-context.md: passkey retrieval and
# perplexity for SmolLM2-135M-Instruct (trained context 8192) with every method.
#
#   .venv/bin/maturin develop --profile opt   # an optimised build (or install a wheel)
#   bench/run_eval.sh                          # hours on 2 CPU cores; safe to interrupt
#
# Every step resumes from the JSON in $OUT, so re-running the script skips the records
# already there and an interrupted run picks up where it stopped. The order: first
# every method at every length with one needle depth and one perplexity window; then
# the SelfExtend sweep and the larger samples for the methods the headline compares;
# then a second perplexity window for every method, and more depths for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/long-context}
ALL_METHODS=${METHODS:-plain,selfextend:auto,selfextend:8,linear,ntk,dynamic-ntk}
METHODS=$ALL_METHODS
# The exact f32 KV cache: the saved records were made with it, and resuming keeps one.
eval_() {
    "$PY" -m selfextend_rs.cli eval "$@" --methods "$METHODS" --out "$OUT" --kv-cache f32 --resume
}

eval_ passkey --lengths 4k 8k 16k --depths 0.5
eval_ ppl --lengths 2k 4k 8k 16k --windows 1
eval_ passkey --lengths 32k --depths 0.5
eval_ ppl --lengths 32k --windows 1
# Which G and W: the SelfExtend sweep (docs/long-context/sweep/), 16 settings per length
# plus plain and selfextend:auto, 5 prompts and 2 text windows per cell. Its prompts use
# seed 1, so the seed-0 prompts above and below are held out from what it chose.
"$PY" -m selfextend_rs.cli eval sweep --lengths 16k 32k --seed 1 --out "$OUT/sweep" \
    --kv-cache f32 --resume
# Larger samples for the methods that matter (10 prompts at 16k, 5 at 32k), with the
# sweep's one setting for both lengths as a method of its own.
BEST=$("$PY" - "$OUT/sweep/sweep.json" <<'PY'
import sys
from selfextend_rs import eval as se_eval
chosen = se_eval.recommend(se_eval.load_result(sys.argv[1]))
print(f"selfextend:{chosen.self_extend.group_size},{chosen.self_extend.window}" if chosen else "")
PY
)
METHODS=plain,selfextend:auto,dynamic-ntk${BEST:+,$BEST}
eval_ passkey --lengths 16k --depths 0 0.25 0.5 0.75 1 --samples 2
eval_ passkey --lengths 32k --depths 0 0.25 0.5 0.75 1

# A second perplexity window for every method (the sweep's setting included), then the
# needle depths the first round left out.
METHODS=$ALL_METHODS${BEST:+,$BEST}
eval_ ppl --lengths 2k 4k 8k 16k 32k --windows 2
eval_ passkey --lengths 4k 8k --depths 0 0.25 0.5 0.75 1
eval_ passkey --lengths 16k --depths 0 0.25 0.5 0.75 1
eval_ passkey --lengths 32k --depths 0.25 0.5 0.75

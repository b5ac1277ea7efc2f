#!/usr/bin/env bash
# The runs behind BENCHMARKS.md, on the bundled default model (SmolLM2-135M-Instruct
# Q4_1 GGUF): vanilla vs SelfExtend speed, and peak RSS per length in separate
# processes (peak RSS is per process). JSON goes to $OUT (default bench-out/), then
# bench/report.py prints the tables and draws docs/benchmarks.png from it.
#
#   bench/run_benchmarks.sh            # about 30 minutes on 2 cores
#   LENGTHS=2048,8192 SE_ONLY= bench/run_benchmarks.sh
#   SPEED=0 bench/run_benchmarks.sh   # only the peak-RSS runs
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-out}
LENGTHS=${LENGTHS:-2048,8192,16384}
# Lengths measured (peak RSS) with SelfExtend only: plain attention past 4x the
# trained context is not worth the minutes.
SE_ONLY=${SE_ONLY-32768}
G=${G:-8}
W=${W:-2048}
MODEL=${MODEL:-$("$PY" -c 'import selfextend_rs; print(selfextend_rs.default_model())')}
BENCH=target/opt/selfextend-bench
mkdir -p "$OUT"
cargo build --quiet --profile opt -p selfextend-bench

echo "== resident memory after loading the model" >&2
"$BENCH" --model "$MODEL" --prefill 1 --decode-context 0 --repeats 1 --attention vanilla --json >"$OUT/load.json"

longest=${LENGTHS##*,}
short=${LENGTHS%,*}
if [[ ${SPEED:-1} == 1 ]]; then
    echo "== speed: prefill $short (3 repeats), decode after ${short##*,}" >&2
    "$BENCH" --model "$MODEL" --prefill "$short" --decode-context "${short##*,}" --decode-tokens 32 \
        --group-size "$G" --window "$W" --repeats 3 --json >"$OUT/speed.json"
    echo "== speed: prefill $longest (1 repeat), decode after it" >&2
    "$BENCH" --model "$MODEL" --prefill "$longest" --decode-context "$longest" --decode-tokens 32 \
        --group-size "$G" --window "$W" --repeats 1 --json >"$OUT/speed-$longest.json"
fi
for n in ${LENGTHS//,/ }; do
    for attention in selfextend vanilla; do
        echo "== peak RSS: $attention prefill $n" >&2
        "$BENCH" --model "$MODEL" --prefill "$n" --decode-context 0 --group-size "$G" --window "$W" \
            --repeats 1 --attention "$attention" --json >"$OUT/rss-$attention-$n.json"
    done
done
for n in ${SE_ONLY//,/ }; do
    echo "== peak RSS: selfextend prefill $n" >&2
    "$BENCH" --model "$MODEL" --prefill "$n" --decode-context 0 --group-size "$G" --window "$W" \
        --repeats 1 --attention selfextend --json >"$OUT/rss-selfextend-$n.json"
done

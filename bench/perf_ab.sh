#!/usr/bin/env bash
# Compares two builds of `selfextend-bench` by where their samples go, for kernel changes
# of a few percent that single timed runs on a shared VM cannot resolve. Runs A, B, B, A
# under `perf record -F 999`, one 8k-token SelfExtend prefill each, and prints per run
# the samples of each attention function and of the packed quantized kernel. The
# quantized kernel does the same work in both builds, so "attention per packed sample"
# (and a changed function's samples beside unchanged ones) compares the builds whatever
# the machine's pace during each run.
#
#   cp target/opt/selfextend-bench /tmp/bench-before      # then change, rebuild
#   bench/perf_ab.sh /tmp/bench-before target/opt/selfextend-bench
#   bench/perf_ab.sh A B --kv-cache f32                    # extra bench arguments
#   MODEL=path/to/model.gguf PREFILL=4096 bench/perf_ab.sh A B
#
# Needs `perf` (linux-perf). The profiles stay in $OUT (default target/perf-ab).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
A=$1 B=$2
shift 2
cd "$(dirname "$0")/.."
MODEL=${MODEL:-$(${PY:-.venv/bin/python} -c 'import selfextend_rs; print(selfextend_rs.default_model())' 2>/dev/null || true)}
[ -f "$MODEL" ] || { echo "no model: set MODEL to a GGUF file" >&2; exit 1; }
OUT=${OUT:-target/perf-ab}
mkdir -p "$OUT"

run=0
for bin in "$A" "$B" "$B" "$A"; do
    run=$((run + 1))
    data="$OUT/run$run.data"
    tok_s=$(perf record -q -F 999 -o "$data" "$bin" --model "$MODEL" --prefill "${PREFILL:-8192}" \
        --decode-context 0 --repeats 1 --attention selfextend --group-size 8 --window 1024 "$@" \
        2>/dev/null | awk '$1 == "prefill" && $3 == "selfextend" { print $4 }')
    perf report -i "$data" -n --no-children --sort symbol 2>/dev/null | awk -v bin="$bin" -v tok="$tok_s" '
        /^#/ { next }
        /qmatrix::x86::avx[0-9]+_tile/ { packed += $2 }
        /values_group/ { values += $2 }
        /fused::run_item::\{\{closure\}\}/ { scores += $2 }
        /fused::rotate_keys/ { rotation += $2 }
        # run_item itself (softmax, the tile loop), wherever the compiler inlined it.
        /fused::run_item$|fused::run_item |LocalKey<.*with_borrow_mut|__expf/ { rest += $2 }
        END {
            attention = values + scores + rotation + rest
            printf "%-40s %7s tok/s  attention/packed %.3f  (packed %d: scores %d, values %d, rotation %d, softmax and loop %d)\n",
                bin, tok, attention / packed, packed, scores, values, rotation, rest
        }'
done

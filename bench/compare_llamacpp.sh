#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` from the llama-cpp-python sdist on PyPI (pinned),
# runs it beside `selfextend-bench` on the same GGUF with the same thread count, plain
# attention, and prints our throughput as a ratio of llama.cpp's: prefill of a
# $PROMPT-token prompt, and $GEN decode steps after $PROMPT tokens of context.
#
#   bench/compare_llamacpp.sh                 # default model, 2 threads, pp2048 / tg128
#   THREADS=4 PROMPT=4096 bench/compare_llamacpp.sh path/to/model.gguf
#
# Everything it downloads or builds goes under $SCRATCH (default target/llamacpp),
# which git ignores. Needs a C/C++ compiler and Python; cmake comes from PyPI.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SCRATCH=${SCRATCH:-$ROOT/target/llamacpp}
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-2048}
GEN=${GEN:-128}
REPEATS=${REPEATS:-3}
PY=${PY:-$ROOT/.venv/bin/python}
MODEL=${1:-$("$PY" -c 'import selfextend_rs; print(selfextend_rs.default_model())')}

mkdir -p "$SCRATCH"
LLAMA_BENCH=$SCRATCH/build/bin/llama-bench
if [[ ! -x $LLAMA_BENCH ]]; then
    echo "== building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist) in $SCRATCH" >&2
    [[ -x $SCRATCH/venv/bin/cmake ]] || {
        python3 -m venv "$SCRATCH/venv"
        "$SCRATCH/venv/bin/pip" install --quiet "cmake>=3.24,<5"
    }
    # `pip download` fetches the sdist the way the user's pip is configured (index,
    # proxy, certificates); the hash pins it.
    "$SCRATCH/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SCRATCH/sdist"
    "$SCRATCH/venv/bin/python" - "$SCRATCH" "$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_CPP_PYTHON_SHA256" <<'PY'
import hashlib, sys, tarfile
from pathlib import Path

scratch, version, sha256 = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sdist = scratch / "sdist" / f"llama_cpp_python-{version}.tar.gz"
digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
if digest != sha256:
    sdist.unlink()
    sys.exit(f"{sdist.name}: sha256 {digest}, expected {sha256}")
with tarfile.open(sdist) as tar:
    tar.extractall(scratch / "src", filter="data")
PY
    # SIMD from what this CPU reports: a native build would use AMX, which these VMs
    # advertise but kill with SIGILL, and an AVX-512 build dies on AVX2-only machines.
    flag() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
    AVX512=OFF
    [[ $(flag avx512f)$(flag avx512bw)$(flag avx512vl) == ONONON ]] && AVX512=ON
    SIMD=(-DGGML_AVX2="$(flag avx2)" -DGGML_FMA="$(flag fma)" -DGGML_F16C="$(flag f16c)"
          -DGGML_AVX512="$AVX512" -DGGML_AVX512_VNNI="$(flag avx512_vnni)"
          -DGGML_AVX512_BF16="$(flag avx512_bf16)")
    echo "== llama.cpp SIMD: ${SIMD[*]}" >&2
    "$SCRATCH/venv/bin/cmake" -S "$SCRATCH/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" \
        -B "$SCRATCH/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF "${SIMD[@]}" \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_TOOLS=ON >/dev/null
    "$SCRATCH/venv/bin/cmake" --build "$SCRATCH/build" --target llama-bench -j "$(nproc)" >/dev/null
fi

OURS=${SELFEXTEND_BENCH:-$ROOT/target/opt/selfextend-bench}
if [[ ! -x $OURS ]]; then
    echo "== building selfextend-bench (profile opt)" >&2
    cargo build --quiet --profile opt -p selfextend-bench
    OURS=$ROOT/target/opt/selfextend-bench
fi

echo "== llama.cpp: pp$PROMPT, and tg$GEN at depth $PROMPT, $THREADS threads, $REPEATS repetitions" >&2
"$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p "$PROMPT" -n 0 -r "$REPEATS" -o json >"$SCRATCH/llamacpp-pp.json"
"$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p 0 -n "$GEN" -d "$PROMPT" -r "$REPEATS" -o json >"$SCRATCH/llamacpp-tg.json"
echo "== selfextend-rs: prefill $PROMPT, decode $GEN tokens after it, $THREADS threads" >&2
RAYON_NUM_THREADS=$THREADS "$OURS" --model "$MODEL" --prefill "$PROMPT" --decode-context "$PROMPT" \
    --decode-tokens "$GEN" --repeats "$REPEATS" --attention vanilla --json >"$SCRATCH/selfextend.json"

"$PY" - "$SCRATCH/llamacpp-pp.json" "$SCRATCH/llamacpp-tg.json" "$SCRATCH/selfextend.json" "$PROMPT" "$GEN" <<'PY'
import json, sys

llama_pp, llama_tg, ours = (json.load(open(p)) for p in sys.argv[1:4])
prompt, gen = int(sys.argv[4]), int(sys.argv[5])
llama_pp = llama_pp[0]["avg_ts"]
llama_tg = llama_tg[0]["avg_ts"]
ours_pp = next(m["tokens_per_second"] for m in ours["measurements"] if m["phase"] == "prefill")
ours_tg = next(m["tokens_per_second"] for m in ours["measurements"] if m["phase"] == "decode")
print(f"{'metric':<34}{'llama.cpp':>12}{'selfextend-rs':>15}{'ratio':>8}")
print(f"{f'prefill {prompt} tok/s':<34}{llama_pp:>12.1f}{ours_pp:>15.1f}{ours_pp / llama_pp:>8.2f}")
print(f"{f'decode {gen} after {prompt} tok/s':<34}{llama_tg:>12.1f}{ours_tg:>15.1f}{ours_tg / llama_tg:>8.2f}")
PY

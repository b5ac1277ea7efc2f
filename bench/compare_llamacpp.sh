#!/usr/bin/env bash
# Runs our `selfextend-bench` beside llama.cpp's `llama-bench` and PyTorch (Hugging Face
# transformers, sdpa attention, f32) on the same GGUF with the same thread count, plain
# attention, and prints our throughput as a ratio of each peer's: prefill of a
# $PROMPT-token prompt, and $GEN decode steps after $PROMPT tokens of context. It also
# measures the machine (FMA peak, memory read bandwidth: `selfextend-bench --machine`)
# and prints our prefill FLOP/s and decode bytes/s as shares of them. The numbers also
# go to bench-out/compare-$PROMPT.json (compare-avx2-$PROMPT.json with AVX2_ONLY=1),
# which `bench/report.py --peers` plots.
#
#   bench/compare_llamacpp.sh                 # default model, 2 threads, pp2048 / tg128
#   THREADS=4 PROMPT=4096 bench/compare_llamacpp.sh path/to/model.gguf
#   TORCH_PY=/path/to/python bench/compare_llamacpp.sh   # a Python with torch, gguf,
#                                             # transformers and accelerate
#   SKIP_TORCH=1 bench/compare_llamacpp.sh    # llama.cpp only
#   AVX2_ONLY=1 bench/compare_llamacpp.sh     # all three without AVX-512, on a machine
#                                             # that has it: a stand-in for AVX2-only CPUs
#
# llama.cpp is built from the llama-cpp-python sdist (pinned), fetched with pip. PyTorch
# goes into its own scratch virtualenv (PyPI's torch wheels bring the CUDA libraries:
# gigabytes), never into the project's. Everything it downloads or builds goes under
# $SCRATCH (default target/llamacpp), which git ignores. Needs a C/C++ compiler and
# Python; cmake comes from PyPI.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SCRATCH=${SCRATCH:-$ROOT/target/llamacpp}
THREADS=${THREADS:-2}
# Ours also runs SelfExtend with group size $GROUP and window $WINDOW (default a
# quarter of the prompt), against the peers' plain attention.
GROUP=${GROUP:-8}
PROMPT=${PROMPT:-2048}
WINDOW=${WINDOW:-$((PROMPT / 4))}
GEN=${GEN:-128}
REPEATS=${REPEATS:-3}
PY=${PY:-$ROOT/.venv/bin/python}
MODEL=${1:-$("$PY" -c 'import selfextend_rs; print(selfextend_rs.default_model())')}

# AVX2_ONLY=1: llama.cpp built without AVX-512 (in its own build directory), our kernels
# told to skip it (SELFEXTEND_NO_AVX512), and PyTorch's ATen, oneDNN and MKL capped at
# AVX2. Same machine otherwise: its caches, memory and clocks are not an AVX2-only CPU's.
AVX2_ONLY=${AVX2_ONLY:-0}
BUILD=$SCRATCH/build
SUMMARY=compare-$PROMPT.json
if [[ $AVX2_ONLY == 1 ]]; then
    BUILD=$SCRATCH/build-avx2
    SUMMARY=compare-avx2-$PROMPT.json
    export SELFEXTEND_NO_AVX512=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        MKL_ENABLE_INSTRUCTIONS=AVX2
fi

mkdir -p "$SCRATCH"
LLAMA_BENCH=$BUILD/bin/llama-bench
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
    [[ $AVX2_ONLY == 1 ]] && AVX512=OFF
    avx512() { [[ $AVX512 == ON ]] && flag "$1" || echo OFF; }
    SIMD=(-DGGML_AVX2="$(flag avx2)" -DGGML_FMA="$(flag fma)" -DGGML_F16C="$(flag f16c)"
          -DGGML_AVX512="$AVX512" -DGGML_AVX512_VNNI="$(avx512 avx512_vnni)"
          -DGGML_AVX512_BF16="$(avx512 avx512_bf16)")
    echo "== llama.cpp SIMD: ${SIMD[*]}" >&2
    "$SCRATCH/venv/bin/cmake" -S "$SCRATCH/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" \
        -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF "${SIMD[@]}" \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_TOOLS=ON >/dev/null
    "$SCRATCH/venv/bin/cmake" --build "$BUILD" --target llama-bench -j "$(nproc)" >/dev/null
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
echo "== selfextend-rs: prefill $PROMPT, decode $GEN tokens after it, $THREADS threads," \
    "plain and SelfExtend G=$GROUP W=$WINDOW" >&2
RAYON_NUM_THREADS=$THREADS "$OURS" --model "$MODEL" --prefill "$PROMPT" --decode-context "$PROMPT" \
    --decode-tokens "$GEN" --repeats "$REPEATS" --attention both --group-size "$GROUP" \
    --window "$WINDOW" --machine --json >"$SCRATCH/selfextend.json"

TORCH_JSON=$SCRATCH/torch.json
rm -f "$TORCH_JSON"
if [[ ${SKIP_TORCH:-0} != 1 ]]; then
    if [[ -z ${TORCH_PY:-} ]]; then
        TORCH_PY=$SCRATCH/torch-venv/bin/python
        if [[ ! -x $TORCH_PY ]] || ! "$TORCH_PY" -c 'import torch, transformers, gguf, accelerate' 2>/dev/null; then
            echo "== installing torch, transformers, gguf and accelerate into $SCRATCH/torch-venv" >&2
            python3 -m venv "$SCRATCH/torch-venv"
            "$SCRATCH/torch-venv/bin/pip" install --quiet torch transformers gguf accelerate
        fi
    fi
    echo "== PyTorch: prefill $PROMPT, decode $GEN tokens after it, $THREADS threads" >&2
    "$TORCH_PY" - "$MODEL" "$THREADS" "$PROMPT" "$GEN" "$REPEATS" >"$TORCH_JSON" <<'PY'
import json, statistics, sys, time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

model_path = Path(sys.argv[1])
threads, prompt, gen, repeats = map(int, sys.argv[2:6])
torch.set_num_threads(threads)
# transformers dequantizes the GGUF to f32: the dense model PyTorch users run.
model = AutoModelForCausalLM.from_pretrained(
    model_path.parent, gguf_file=model_path.name, dtype=torch.float32, attn_implementation="sdpa"
).eval()
ids = torch.randint(10, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
prefill, decode = [], []
with torch.inference_mode():
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill.append(prompt / (time.perf_counter() - start))
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(gen):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode.append(gen / (time.perf_counter() - start))
print(json.dumps({"prefill": statistics.median(prefill), "decode": statistics.median(decode),
                  "torch": torch.__version__}))
PY
fi

mkdir -p "$ROOT/bench-out"
"$PY" - "$SCRATCH/llamacpp-pp.json" "$SCRATCH/llamacpp-tg.json" "$SCRATCH/selfextend.json" \
    "$TORCH_JSON" "$PROMPT" "$GEN" "$ROOT/bench-out/$SUMMARY" "$AVX2_ONLY" <<'PY'
import json, sys
from pathlib import Path

llama_pp, llama_tg, ours = (json.load(open(p)) for p in sys.argv[1:4])
torch_file, prompt, gen = Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
summary_file, avx2_only = Path(sys.argv[7]), sys.argv[8] == "1"
torch = json.loads(torch_file.read_text()) if torch_file.exists() else None
def ours_at(phase, attention):
    return next(m["tokens_per_second"] for m in ours["measurements"]
                if m["phase"] == phase and m["attention"] == attention)


se = f"SelfExtend G={ours['group_size']} W={ours['window']}"
rows = [
    (f"prefill {prompt} tok/s", llama_pp[0]["avg_ts"], torch and torch["prefill"],
     ours_at("prefill", "vanilla")),
    (f"decode {gen} after {prompt} tok/s", llama_tg[0]["avg_ts"], torch and torch["decode"],
     ours_at("decode", "vanilla")),
    (f"  ours with {se}, prefill", llama_pp[0]["avg_ts"], torch and torch["prefill"],
     ours_at("prefill", "selfextend")),
    (f"  ours with {se}, decode", llama_tg[0]["avg_ts"], torch and torch["decode"],
     ours_at("decode", "selfextend")),
]
# The CPU, named as the plot labels it: these VMs' model names ("AMD EPYC") omit the
# generation, which family and model tell (25/1 is Zen 3, 25/17 Zen 4).
info = {key.strip(): value.strip() for key, value in
        (line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)}
cpu = info.get("model name", "?")
if "cpu family" in info:
    cpu += f" ({info['cpu family']}/{info['model']})"
summary = {"prompt": prompt, "gen": gen, "kv_cache": ours.get("kv_cache"), "avx2_only": avx2_only,
           "cpu": cpu,
           "torch": torch and torch["torch"], "machine": ours.get("machine"),
           "rows": [{"metric": name, "llama.cpp": llama, "pytorch": pt, "ours": us}
                    for name, llama, pt, us in rows]}
summary_file.write_text(json.dumps(summary, indent=1) + "\n")
print(f"{'metric (peers: plain attention)':<42}{'llama.cpp':>10}{'PyTorch':>9}{'ours':>8}"
      f"{'/llama.cpp':>12}{'/PyTorch':>10}")
for name, llama, pt, us in rows:
    pt_cols = f"{pt:>9.1f}" if pt else f"{'-':>9}"
    pt_ratio = f"{us / pt:>10.2f}" if pt else f"{'-':>10}"
    print(f"{name:<42}{llama:>10.1f}{pt_cols}{us:>8.1f}{us / llama:>12.2f}{pt_ratio}")
print(f"ours: KV cache {ours.get('kv_cache', '?')}; PyTorch "
      f"{torch['torch'] + ', f32, sdpa' if torch else 'skipped'}"
      f"{'; all three without AVX-512 (AVX2_ONLY=1)' if avx2_only else ''}")
print(f"CPU: {cpu}")
machine = ours.get("machine")
if machine:
    int8 = (f", 8-bit ({machine['int8_isa']}) {machine['int8_peak_ops'] / 1e9:.1f} GOP/s"
            if machine.get("int8_peak_ops") else "")
    print(f"\nours against this machine ({machine['threads']} threads): f32 FMA ({machine['isa']}) "
          f"{machine['fma_peak_flops'] / 1e9:.1f} GFLOP/s{int8}, "
          f"memory read {machine['read_bytes_per_second'] / 1e9:.1f} GB/s")
    for m in ours["measurements"]:
        rate = m["tokens_per_second"] * m["work_per_token"]
        if m["phase"] == "prefill":
            what = f"{rate / 1e9:.1f} GFLOP/s ({m['work_per_token'] / 1e9:.2f} GFLOP/token)"
            limit = "of the fastest these FLOPs could run here (8-bit peak for quantized layers)"
        else:
            what = f"{rate / 1e9:.1f} GB/s ({m['work_per_token'] / 1e6:.1f} MB/token)"
            limit = "of the read bandwidth"
        print(f"  {m['phase']} at {m['context']} ({m['attention']}): {what}, "
              f"{100 * m['share_of_machine']:.0f}% {limit}")
PY

"""Where the calling thread of a forward pass spends the time the pool's workers wait.

    perf record -F 499 --call-graph dwarf,16384 -o perf.data \
        target/opt/selfextend-bench --model "$M" --prefill 16 --decode-context 32 \
        --decode-tokens 64 --batch 8 --attention vanilla --repeats 6
    perf script -i perf.data --comms selfextend-benc -F comm,ip,sym > stacks.txt
    python3 bench/serial_share.py stacks.txt [--top 12]

Every sample of the calling thread inside `Decoder::forward_batch` is either parallel
work (its stack passes through candle's `BarrierPool::execute_chunked`, which the
workers share) or serial work, charged to the innermost frame of this project or of
candle. Samples while loading the model are left out. The shares are of the thread's
samples in the forward passes: serial work is what a second core cannot help with.
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stacks", help="`perf script -F comm,ip,sym` output")
    parser.add_argument("--top", type=int, default=12, help="serial functions to list")
    args = parser.parse_args()

    with open(args.stacks, encoding="utf-8", errors="replace") as f:
        samples = f.read().split("\n\n")
    total = parallel = 0
    serial: Counter[str] = Counter()
    for sample in samples:
        frames = [line.strip().split(" ", 1)[-1] for line in sample.strip().splitlines()[1:]]
        if not frames or any("Model::load" in f for f in frames):
            continue
        if not any("forward_batch" in f for f in frames):
            continue
        total += 1
        if any("execute_chunked" in f for f in frames):
            parallel += 1
            continue
        serial[next((f for f in frames if "selfextend" in f or "candle" in f), frames[0])] += 1
    if total == 0:
        raise SystemExit("no samples inside Decoder::forward_batch (was perf run with --call-graph dwarf?)")
    print(f"{total} samples in forward passes: parallel {100 * parallel / total:.1f}%, "
          f"serial {100 * (total - parallel) / total:.1f}%")
    for name, n in serial.most_common(args.top):
        print(f"{100 * n / total:6.2f}%  {name}")


if __name__ == "__main__":
    main()

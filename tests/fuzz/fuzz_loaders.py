"""Fuzzes the parsers that read untrusted bytes, through the public API.

    python tests/fuzz/fuzz_loaders.py TARGET [libFuzzer flags] [corpus dir]
    python tests/fuzz/fuzz_loaders.py gguf -max_total_time=45 /tmp/fuzz-gguf
    make fuzz                                  # every target, FUZZ_SECONDS each (CI)

TARGET is one of gguf, config, safetensors, tokenizer. Each input becomes one file of
a valid micro checkpoint (or the whole GGUF file) and goes to `Model.load`; a model
that loads must also generate a token. The only acceptable failure is a
`SelfExtendError` that is not an internal error (a Rust panic caught at the
boundary). Anything else, or a crash of the process, is a finding.

Atheris instruments Python only, so libFuzzer gets no coverage from the Rust parsers
and would shrink its corpus to a few bytes. Instead, each libFuzzer input drives edits
of a valid seed file from tests/fuzz/corpus (written by make_corpus.py): bytes and
64-bit fields overwritten with boundary values, truncation, insertion, deletion and,
for JSON, values replaced by ones of the wrong type or size. So every input is a
plausible file with a few things wrong, which is what reaches deep into a parser.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports():
    import selfextend_rs as se

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = {
    "config": "config.json",
    "safetensors": "model.safetensors",
    "tokenizer": "tokenizer.json",
}
BOUNDARY = [0, 1, 2, 7, 8, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
JSON_VALUES: list[Any] = [0, -1, 1, 2**31, 2**63, 10**30, 0.5, -1e308, "", "x" * 300, None, True, [], {}, [1, 2]]
OUTCOMES = {"loaded and generated": 0, "refused with SelfExtendError": 0}


def mutate_bytes(seed: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    data = bytearray(seed)
    # Headers and metadata sit at the start of every format here: favour them.
    window = fdp.PickValueInList([256, 4096, len(data)])
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        if not data:
            break
        pos = fdp.ConsumeIntInRange(0, max(0, min(window, len(data)) - 1))
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind == 0:
            data[pos] = fdp.ConsumeInt(1) & 0xFF
        elif kind == 1:
            data[pos:pos + 8] = struct.pack("<Q", fdp.PickValueInList(BOUNDARY))
        elif kind == 2:
            data[pos:pos + 4] = struct.pack("<I", fdp.PickValueInList(BOUNDARY) & 0xFFFF_FFFF)
        elif kind == 3:
            del data[pos:]
        elif kind == 4:
            data[pos:pos] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        else:
            del data[pos:pos + fdp.ConsumeIntInRange(1, 64)]
    return bytes(data)


def mutate_json(seed: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    doc = json.loads(seed)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        # Walk to a random node, then replace or delete one of its entries.
        node: Any = doc
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
            children = [c for c in children if isinstance(c, (dict, list)) and c]
            if not children:
                break
            node = fdp.PickValueInList(children)
        if isinstance(node, dict) and node:
            key = fdp.PickValueInList(sorted(node))
            if fdp.ConsumeBool():
                del node[key]
            else:
                node[key] = copy.deepcopy(fdp.PickValueInList(JSON_VALUES))
        elif isinstance(node, list) and node:
            i = fdp.ConsumeIntInRange(0, len(node) - 1)
            node[i] = copy.deepcopy(fdp.PickValueInList(JSON_VALUES))
    return json.dumps(doc).encode()


def exercise(path: Path) -> None:
    try:
        model = se.Model.load(path)
        model.generate([0], max_new_tokens=1)
        OUTCOMES["loaded and generated"] += 1
    except se.SelfExtendError as e:
        if str(e).startswith("internal error"):
            raise
        OUTCOMES["refused with SelfExtendError"] += 1
    runs = sum(OUTCOMES.values())
    if runs % 5_000 == 0:
        print(f"fuzz outcomes after {runs} inputs: {OUTCOMES}", file=sys.stderr, flush=True)


def main() -> None:
    target = sys.argv.pop(1)
    if target != "gguf" and target not in FILES:
        sys.exit(f"unknown target {target!r}; expected gguf, {', '.join(FILES)}")
    seeds = [p.read_bytes() for p in sorted((CORPUS / target).iterdir())]
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    if target == "gguf":
        path = work / "model.gguf"
        victim = path
    else:
        for f in (CORPUS / "checkpoint").iterdir():
            shutil.copy(f, work / f.name)
        path, victim = work, work / FILES[target]
    is_json = target in ("config", "tokenizer")

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        seed = fdp.PickValueInList(seeds)
        how = fdp.ConsumeIntInRange(0, 7)
        if how == 0:
            content = fdp.ConsumeBytes(fdp.remaining_bytes())  # raw libFuzzer bytes
        elif is_json and how <= 4:
            content = mutate_json(seed, fdp)
        else:
            content = mutate_bytes(seed, fdp)
        victim.write_bytes(content)
        exercise(path)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

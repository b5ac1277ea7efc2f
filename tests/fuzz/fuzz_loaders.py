"""Fuzzes the parsers that read untrusted bytes, through the public API.

    python tests/fuzz/fuzz_loaders.py TARGET [libFuzzer flags] [corpus dirs]
    python tests/fuzz/fuzz_loaders.py gguf -max_total_time=45 tests/fuzz/corpus/gguf
    make fuzz                                  # every target, FUZZ_SECONDS each (CI)

TARGET is one of gguf, config, safetensors, tokenizer. Each input replaces one file
of a valid micro checkpoint (or is the whole GGUF file) and goes to `Model.load`; a
model that loads must also generate a token. The only acceptable failure is a
`SelfExtendError` that is not an internal error (a Rust panic caught at the
boundary). Anything else, or a crash of the process, is a finding.

Atheris instruments Python only, so this is mutation fuzzing of the Rust parsers
without coverage feedback. The seed corpus (tests/fuzz/corpus, written by
make_corpus.py) starts it from valid files.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import selfextend_rs as se

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = {
    "config": "config.json",
    "safetensors": "model.safetensors",
    "tokenizer": "tokenizer.json",
}


def exercise(path: Path) -> None:
    try:
        model = se.Model.load(path)
        model.generate([0], max_new_tokens=1)
    except se.SelfExtendError as e:
        if str(e).startswith("internal error"):
            raise
    except KeyboardInterrupt:
        raise


def main() -> None:
    target = sys.argv.pop(1)
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    if target == "gguf":
        path = work / "model.gguf"

        def one_input(data: bytes) -> None:
            path.write_bytes(data)
            exercise(path)
    elif target in FILES:
        # A valid checkpoint directory whose one file each input replaces.
        base = CORPUS / "checkpoint"
        for f in base.iterdir():
            shutil.copy(f, work / f.name)
        victim = work / FILES[target]

        def one_input(data: bytes) -> None:
            victim.write_bytes(data)
            exercise(work)
    else:
        sys.exit(f"unknown target {target!r}; expected gguf, {', '.join(FILES)}")
    os.environ.setdefault("RUST_BACKTRACE", "0")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""Writes the fuzzers' seed corpus: the files of the micro checkpoint and its GGUF.

    python tests/fuzz/make_corpus.py          # rewrites tests/fuzz/corpus (committed)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gguf_files import write_gguf  # noqa: E402
from tiny_models import write_checkpoint  # noqa: E402


def main() -> None:
    corpus = HERE / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    checkpoint = write_checkpoint(corpus / "checkpoint", "micro")
    for target, name in [("config", "config.json"), ("safetensors", "model.safetensors"),
                         ("tokenizer", "tokenizer.json")]:
        (corpus / target).mkdir()
        shutil.copy(checkpoint / name, corpus / target / f"seed-{name}")
    (corpus / "gguf").mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        for quant in [None, "Q8_0"]:
            out = write_gguf(checkpoint, Path(tmp) / "m.gguf", quant=quant)
            shutil.copy(out, corpus / "gguf" / f"seed-{quant or 'f32'}.gguf")
    for f in sorted(corpus.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size:>8}  {f.relative_to(HERE)}")


if __name__ == "__main__":
    main()

"""Typing: the stubs match the compiled module, and programs type-check against them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

import selfextend_rs as se
from selfextend_rs import _cpu

USES_THE_API = '''
from pathlib import Path

import numpy as np
import selfextend_rs as se


def answer(path: Path, prompt: str) -> tuple[str, int]:
    model = se.Model.load(path)
    ext = se.SelfExtend.auto(4 * model.config.trained_context, model.config.trained_context)
    out: se.Completion = model.generate(prompt, max_new_tokens=8, self_extend=ext, seed=1)
    for piece in model.stream(prompt, max_new_tokens=4, self_extend="auto"):
        assert isinstance(piece, str)
    logits: np.ndarray = model.logits(model.tokenizer.encode(prompt))
    chat = model.chat([{"role": "user", "content": prompt}], max_new_tokens=4)
    try:
        se.Model.load("missing")
    except se.ModelLoadError as e:
        print(e)
    return out.text + chat.text, int(logits.shape[0]) + ext.max_context(8192)
'''

MISUSES_THE_API = '''
from types import MappingProxyType

import selfextend_rs as se

se.SelfExtend("4", 512)
se.Model.load("m").generate(42)
se.Model.load("m").chat([MappingProxyType({"role": "user", "content": "hi"})])
'''


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    program = tmp_path / "program.py"
    program.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )


def test_stubs_match_the_compiled_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "selfextend_rs"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_program_using_the_api_type_checks(tmp_path: Path) -> None:
    out = mypy(tmp_path, USES_THE_API)
    assert out.returncode == 0, out.stdout + out.stderr


def test_misuse_is_a_type_error(tmp_path: Path) -> None:
    out = mypy(tmp_path, MISUSES_THE_API)
    assert out.returncode == 1, out.stdout
    assert out.stdout.count("error:") == 3, out.stdout


def test_messages_are_dicts(model: se.Model) -> None:
    """As the stubs say (a Mapping is a type error there): the native layer takes only dicts."""
    with pytest.raises(TypeError, match="dict"):
        model.chat([MappingProxyType({"role": "user", "content": "hi"})], 1)


def test_version_comes_from_cargo() -> None:
    cargo = (Path(__file__).resolve().parent.parent / "Cargo.toml").read_text()
    assert f'version = "{se.__version__}"' in cargo


def test_cpu_check_can_be_skipped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_cpu, "missing_features", lambda text: ["avx2"])
    try:
        _cpu.check()
    except ImportError as e:
        assert "avx2" in str(e) and _cpu.SKIP_VARIABLE in str(e)
    else:
        assert not Path("/proc/cpuinfo").exists(), "the check did not run"
    monkeypatch.setenv(_cpu.SKIP_VARIABLE, "0")
    _cpu.check()


def test_cpu_check_names_missing_features() -> None:
    modern = "processor : 0\nflags : fpu avx avx2 bmi1 bmi2 f16c fma abm movbe xsave sse4_2\n"
    old = "processor : 0\nflags : fpu sse sse2 sse4_2 avx xsave\n"
    assert _cpu.missing_features(modern) == []
    assert _cpu.missing_features(old) == ["avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"]

"""The `selfextend-rs` command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfextend_rs import cli


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "selfextend_rs.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_help_explains_the_knobs() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ["generate", "chat", "info", "demo"]:
        assert command in out.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "(L - W) * G + W" in sub.stdout


def test_info(model_path: Path) -> None:
    out = run("info", "--model", str(model_path), "-G", "4", "-W", "8", "--target", "200")
    assert out.returncode == 0, out.stderr
    assert re.search(r"trained context \(L\) +32\n", out.stdout), out.stdout
    assert "context with G=4 W=8" in out.stdout and "104" in out.stdout
    assert "auto for 200 tokens" in out.stdout


def test_generate_streams_text(model_path: Path) -> None:
    out = run("generate", "--model", str(model_path), "--prompt", "Once upon a time", "-n", "6", "-v")
    assert out.returncode == 0, out.stderr
    assert "prompt tokens" in out.stderr


def test_errors_are_reported_not_raised(tmp_path: Path, model_path: Path) -> None:
    out = run("info", "--model", str(tmp_path / "missing"))
    assert out.returncode == 1 and out.stderr.startswith("error: cannot read")
    out = run("generate", "--model", str(model_path))
    assert out.returncode != 0 and "--prompt" in out.stderr
    out = run("generate", "--model", str(model_path), "-p", "x", "-G", "0", "-W", "4")
    assert out.returncode == 1 and "group_size" in out.stderr


def test_chat_reads_turns_from_stdin(tmp_path: Path, model_path: Path) -> None:
    # The tiny checkpoint has no template: the error names the problem.
    out = run("chat", "--model", str(model_path), "-n", "4", stdin="hello\n/exit\n")
    assert out.returncode == 1 and "no chat template" in out.stderr


@pytest.mark.usefixtures("quiet_context")
def test_demo_builds_the_prompt_eval_builds(model_path: Path) -> None:
    """`demo --seed S --depth D` asks the same prompt (same key, same tokens) as
    `eval passkey` does for that length, depth and seed."""
    import selfextend_rs as se
    from selfextend_rs import eval as se_eval

    out = run("demo", "--model", str(model_path), "--multiples", "8", "--depth", "0.25",
              "--seed", "3", "--no-progress")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[1:2] == ["plain"]]
    (tokens, _, key, *_), = rows
    model = se.Model.load(model_path)
    result = se_eval.run_passkey(model, lengths=[8 * model.config.trained_context], depths=[0.25],
                                 seed=3, methods=["plain"], progress=False)
    (record,) = result["records"]
    assert (record["key"], record["prompt_tokens"]) == (key, int(tokens))
    other = run("demo", "--model", str(model_path), "--multiples", "8", "--depth", "0.25",
                "--seed", "4", "--no-progress")
    assert key not in other.stdout  # the seed picks the key
    bad = run("demo", "--model", str(model_path), "--depth", "1.5")
    assert bad.returncode == 2 and "depth must be in [0, 1]" in bad.stderr
    short = run("demo", "--model", str(model_path), "--multiples", "2", "--no-progress")
    assert short.returncode == 1 and "too short for a passkey prompt" in short.stderr
    assert "use larger --multiples" in short.stderr and "Traceback" not in short.stderr
    no_digits = run("demo", "--model", str(model_path), "--multiples", "8", "--digits", "0")
    assert no_digits.returncode == 1 and "--digits must be >= 1" in no_digits.stderr


def test_demo_runs_on_a_tiny_setting(model_path: Path) -> None:
    out = run("demo", "--model", str(model_path), "--multiples", "8", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "plain" in out.stdout and "SelfExtend G=" in out.stdout
    assert out.stdout.count("✓") + out.stdout.count("✗") == 2
    assert "answers correct" in out.stdout


def test_demo_defaults_to_one_and_a_half_and_two_times_the_trained_context() -> None:
    # (A tiny model's prompts cannot be that short: its intro alone is longer.)
    args = cli.build_parser().parse_args(["demo"])
    assert args.multiples == [1.5, 2.0]


def test_extract_key() -> None:
    assert cli.extract_key(" 12345. The", 5) == "12345"
    assert cli.extract_key(" is 123 and 45", 5) == "123"
    assert cli.extract_key("\x13abc", 5) == "?abc"

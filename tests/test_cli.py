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


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt-file", "{tmp}/missing.txt"], "error: cannot read --prompt-file"),
    (["generate", "--prompt-file", "{tmp}/latin1.txt"], "error: cannot read --prompt-file"),
    (["generate", "-p", "x", "--max-new-tokens", "99999999999999999999"], "to 2**63 - 1, got 9999"),
    (["generate", "-p", "x", "--seed", str(2 ** 64)], "--seed: must be an integer from 0 to 2**64 - 1"),
    (["info", "--target", "99999999999999999999"], "--target: must be an integer"),
    (["demo", "--multiples", "nan"], "--multiples: must be a finite number > 0"),
    (["demo", "--multiples", "inf"], "--multiples: must be a finite number > 0"),
    (["eval", "passkey", "--lengths", "infk"], "--lengths: not a length: 'infk'"),
])
def test_bad_arguments_end_in_one_error_line(tmp_path: Path, model_path: Path, args: list[str],
                                             message: str) -> None:
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = run(*args, "--model", str(model_path))
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def main_status(*args: str) -> int:
    """cli.main in this process, with `raise SystemExit("error: ...")` as the
    interpreter would report it: the message on stderr, status 1."""
    try:
        return cli.main(list(args))
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)


def test_serve_checks_the_port_and_passes_the_body_limit(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], model_path: Path) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    server = pytest.importorskip("selfextend_rs.server")
    # (Parsed only: a serve that took the port would listen until the timeout.)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "--port", "70000"])
    assert e.value.code == 2
    assert "--port: must be an integer from 0 to 65535, got 70000" in capsys.readouterr().err
    seen: dict[str, object] = {}
    monkeypatch.setattr(server, "create_app", lambda model, **options: seen.update(options) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(port=options["port"]))
    assert main_status("serve", "--model", str(model_path), "--port", "0", "--max-body-mb", "2") == 0
    assert seen["port"] == 0 and seen["max_body_bytes"] == 2 * 2**20 and seen["default_self_extend"] == "auto"


def test_zero_group_size_or_window_is_not_ignored(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], model_path: Path) -> None:
    for knob in ["-G", "-W"]:
        assert main_status("generate", "--model", str(model_path), "-p", "x", knob, "0",
                           "--self-extend", "auto") == 1
        assert "exclusive" in capsys.readouterr().err
    assert main_status("info", "--model", str(model_path), "--target", "0") == 1
    assert "`target_length`: must be >= 1" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded the model"))
    assert main_status("serve", "-G", "0", "-W", "4") == 1
    assert "invalid argument `group_size`: must be >= 1" in capsys.readouterr().err


def test_eval_checks_its_output_before_loading_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded the model"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in [a_file, a_file / "sub"] + ([Path("/proc")] if Path("/proc/self").is_dir() else []):
        # (Not even root may create files in /proc.)
        assert main_status("eval", "passkey", "--out", str(out)) == 2
        assert f"error: --out {out} is not a writable directory" in capsys.readouterr().err
    saved = tmp_path / "out" / "passkey.json"
    saved.parent.mkdir()
    for content, message in [(b"{not json", "Expecting property name"), (b"\xff\xfe", "codec can't decode"),
                             (b"[1, 2]", "it holds no saved run")]:
        saved.write_bytes(content)
        assert main_status("eval", "passkey", "--out", str(saved.parent), "--resume") == 2
        err = capsys.readouterr().err
        assert f"error: cannot resume from {saved}: " in err and message in err, err


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

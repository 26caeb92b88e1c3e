"""The machine a benchmark ran on, recorded in its JSON beside the figures: the CPU model, its
vector-unit flags and core count (as `lscpu` reports them), the Python and library versions, and the load average
before and after (figures from a busy machine are indicative only: compare ratios from
interleaved runs, never absolute times)."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    """`lscpu`'s "Model name", or what Python knows where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.TimeoutExpired, StopIteration):
        return platform.processor() or platform.machine()


# The vector-unit flags that decide CPU matmul speed (lscpu prints ~100 flags; these matter here).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of SIMD_FLAGS `lscpu` lists (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    listed = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return [flag for flag in SIMD_FLAGS if flag in listed]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(load_before: list[float] | None = None, **versions: str) -> dict:
    """The "machine" block of a benchmark's JSON; `versions` names libraries (numpy=..., jax=...)."""
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **versions,
            "load_average_1_5_15_min": {"before": load_before, "after": load_average()}}

"""What this machine's CPU offers that a search's arithmetic depends on (no PyTorch import: the
web process asks too, to refuse a choice this server would run slowly)."""

from __future__ import annotations

from pathlib import Path

#: Linux's /proc/cpuinfo flags of native bfloat16 arithmetic: AVX-512 BF16 (dot products) and
#: AMX-BF16 (tiles) on x86, the "bf16" feature on Arm.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def bfloat16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """This CPU's native bfloat16 instruction flags (e.g. ``["avx512_bf16"]``); ``[]`` where it
    has none or the system does not say (no /proc/cpuinfo).

    Without them PyTorch's bfloat16 autocast is emulated: on the AMD EPYC (Zen 4) of the session
    of 2026-12-07, oneDNN held to AVX-512 without BF16 ran the search's fitness at 0.85x float32's
    speed and held to AVX2 at 0.10x, against 1.39x natively (docs/BENCHMARKS.md, "bfloat16 search")."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features") and ":" in line:  # x86 / Arm spelling
            flags.update(line.split(":", 1)[1].split())
    return sorted(flags & BFLOAT16_FLAGS)

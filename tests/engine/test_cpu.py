"""engine.cpu: which native bfloat16 instructions /proc/cpuinfo lists (x86 and Arm spellings)."""

from __future__ import annotations

from engine.cpu import bfloat16_flags


def test_bfloat16_flags_are_read_from_either_spelling_and_only_those(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16 avx512_vnni\n"
        "model name\t: Some CPU with bf16 in its name\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16\n"
    )
    assert bfloat16_flags(x86) == ["amx_bf16", "avx512_bf16"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n")
    assert bfloat16_flags(arm) == ["bf16"]
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n")
    assert bfloat16_flags(avx2) == []
    assert bfloat16_flags(tmp_path / "missing") == []


def test_this_machine_answers_without_error():
    flags = bfloat16_flags()
    assert isinstance(flags, list) and all(isinstance(flag, str) for flag in flags)

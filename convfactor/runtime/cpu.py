"""What this CPU is, read from /proc/cpuinfo: its model name and the instruction-set flags that decide
how onnxruntime's kernels run (one reader for the benchmarks' machine names and the int8 weight range).

Two CPUs with one brand string (a VM's "AMD EPYC") can differ in vector units: an AVX2-only and an
AVX-512/VNNI EPYC both served this repository's benchmarks, so a machine's name carries its ``ISA_FLAGS``.
"""

from __future__ import annotations

import platform

__all__ = ["ISA_FLAGS", "parse_cpuinfo", "cpu_flags", "cpu_model"]

# The vector extensions onnxruntime's CPU kernels dispatch on (in the order a machine name lists them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, every flag) of the first CPU in /proc/cpuinfo's ``text`` (None and an empty set where absent)."""
    name, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if name is None and key in ("model name", "Processor", "cpu model") and value:
            name = value
        elif flags is None and key in ("flags", "Features"):
            flags = set(value.split())
        if name is not None and flags is not None:
            break
    return name, flags or set()


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return info.read()
    except OSError:
        return ""


def cpu_flags(text: str | None = None) -> set[str]:
    """This CPU's flags (``text``: a /proc/cpuinfo to read instead)."""
    return parse_cpuinfo(_cpuinfo() if text is None else text)[1]


def cpu_model(text: str | None = None) -> str:
    """The CPU's model name with the ``ISA_FLAGS`` it reports in brackets (``AMD EPYC [avx2 avx512f
    avx512_vnni]``), or what the platform module knows (``text``: a /proc/cpuinfo to read instead)."""
    name, flags = parse_cpuinfo(_cpuinfo() if text is None else text)
    name = name or platform.processor() or platform.machine() or "unknown"
    features = [f for f in ISA_FLAGS if f in flags]
    return f"{name} [{' '.join(features)}]" if features else name

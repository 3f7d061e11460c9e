"""What machine a figure came from."""
from __future__ import annotations

import os
import platform

from ..cpuinfo import first_processor

# The vector extensions the CPU kernel's speed turns on (csrc/cpu/avx512_steps.h needs AVX-512 BF16;
# FP16 and AMX tell an Intel Xeon of one generation from another), as /proc/cpuinfo names them
_AVX512_PARTS = [("avx512_bf16", "BF16"), ("avx512_fp16", "FP16")]


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, with its family and model numbers and the vector extensions above.
    A virtual machine often shows only a vendor line ("AMD EPYC"), and one name then covers CPUs
    whose ratios differ (a Zen 4 is family 25, a Zen 5 family 26): the numbers tell them apart."""
    fields = first_processor(cpuinfo)
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    facts = []
    if "cpu family" in fields and "model" in fields:
        facts.append(f"CPU family {fields['cpu family']}, model {fields['model']}")
    extensions = _vector_extensions(set(fields.get("flags", "").split()))
    if extensions:
        facts.append(extensions)
    return f"{name} ({'; '.join(facts)})" if facts else name


def _vector_extensions(flags: set) -> str:
    """The label of cpuinfo's vector flags: AVX-512 with its BF16/FP16 parts and AMX, or AVX2, or none."""
    if "avx512f" not in flags:
        return "AVX2" if "avx2" in flags else ""
    parts = "/".join(label for flag, label in _AVX512_PARTS if flag in flags)
    return "AVX-512" + (f" {parts}" if parts else "") + (", AMX" if "amx_tile" in flags else "")


def cpu_cores() -> int:
    return os.cpu_count() or 1

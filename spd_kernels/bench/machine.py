"""What machine a figure came from."""
from __future__ import annotations

import os
import platform

# The vector extensions the CPU kernel's speed turns on (csrc/cpu/avx512_steps.h needs AVX-512 BF16;
# FP16 and AMX tell an Intel Xeon of one generation from another), as /proc/cpuinfo names them
_AVX512_PARTS = [("avx512_bf16", "BF16"), ("avx512_fp16", "FP16")]


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, with its family and model numbers and the vector extensions above.
    A virtual machine often shows only a vendor line ("AMD EPYC"), and one name then covers CPUs
    whose ratios differ (a Zen 4 is family 25, a Zen 5 family 26): the numbers tell them apart."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    facts = [f"CPU family {fields['cpu family']}, model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        parts = [label for flag, label in _AVX512_PARTS if flag in flags]
        facts.append("AVX-512" + (" " + "/".join(parts) if parts else "") + (", AMX" if "amx_tile" in flags else ""))
    elif "avx2" in flags:
        facts.append("AVX2")
    return f"{name} ({'; '.join(facts)})" if facts else name


def cpu_cores() -> int:
    return os.cpu_count() or 1

"""The first processor's fields of /proc/cpuinfo (vendor, family, model, flags): what the CPU kernel's
tuning (``spd_kernels.cpu_prefetch``) and the bench's machine line (``spd_kernels.bench.machine``) read."""
from __future__ import annotations

from typing import Dict


def first_processor(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, str]:
    """The first processor block's ``key: value`` fields ({} where there is no such file)."""
    fields: Dict[str, str] = {}
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
    return fields

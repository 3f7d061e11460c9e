"""Which cache the CPU kernel's AVX-512 steps prefetch into: ``'l1'`` (prefetcht0) or ``'l2'`` (prefetcht1).

The steps with a bf16 second moment (csrc/cpu/avx512_steps.h) prefetch each stream 1024 elements
ahead. Which cache is faster to fill depends on the core, and the results never do (the tests hold
both levels to the same bits):

- on a Zen 4 (AMD CPU family 25 with AVX-512), into L2 took 5-6% off the bf16 and the
  fp8 m + bf16 v steps on vit_b against L1 in the same build, and was faster in 15 of 17
  alternating pairs for each (docs/results/cpu.md);
- a Zen 5 and an Intel Xeon were measured into L1 only, which is the default there.

``SPD_KERNELS_CPU_PREFETCH=l1`` or ``=l2`` overrides the default when the kernel loads (for an A/B
without a rebuild); ``set_prefetch`` changes it at run time. Steps already running finish with the
level they started with.
"""
from __future__ import annotations

import os

from .cpuinfo import first_processor

ENV = "SPD_KERNELS_CPU_PREFETCH"
LEVELS = {"l1": 1, "l2": 2}  # the C++ PrefetchInto values (csrc/cpu/prefetch_level.h)


def default_level(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'l2' on a Zen 4, 'l1' elsewhere (see the module's docstring)."""
    fields = first_processor(cpuinfo)
    zen4 = (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())
    return "l2" if zen4 else "l1"


def configured_level(cpuinfo: str = "/proc/cpuinfo") -> str:
    """SPD_KERNELS_CPU_PREFETCH when set (checked), else this CPU's default."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return default_level(cpuinfo)
    if value.lower() not in LEVELS:
        raise ValueError(f"{ENV}={value!r}: expected 'l1' (prefetch into L1) or 'l2' (into L2), "
                         f"or unset for this CPU's default ({default_level(cpuinfo)!r})")
    return value.lower()


def _ops():
    from . import _cpu

    error = _cpu.load_error()
    if error:
        raise RuntimeError(f"the compiled CPU kernel is not available ({error})")
    import torch

    return torch.ops.spd_kernels


def _name(level: int) -> str:
    return next(name for name, value in LEVELS.items() if value == int(level))


def prefetch() -> str:
    """The level the CPU kernel's steps prefetch into now."""
    return _name(_ops().prefetch_level())


def set_prefetch(level: str) -> str:
    """Make the CPU kernel's steps prefetch into ``level`` ('l1' or 'l2'); returns the level it replaced."""
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ValueError(f"set_prefetch: level must be 'l1' (prefetch into L1) or 'l2' (into L2), got {level!r}")
    return _name(_ops().set_prefetch_level(LEVELS[level.lower()]))

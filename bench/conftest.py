"""Shared pieces of the CPU microbenchmarks: collected medians and a closing table.

Run with: python -m pytest bench/ --benchmark-only   (see README)
"""
from __future__ import annotations

import os

import pytest
import torch

from spd_kernels.bench.machine import cpu_model

#: (set, impl) -> (median seconds, minimal bytes moved per step)
MEDIANS: dict = {}


def record(benchmark, set_name: str, impl: str, nbytes: int) -> None:
    MEDIANS[(set_name, impl)] = (benchmark.stats.stats.median, nbytes)


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    w = terminalreporter.write_line
    bw = MEDIANS.get(("bandwidth", "in-place add"))
    add_gbs = bw[1] / bw[0] / 1e9 if bw else None
    w("")
    w(f"AdamSPD CPU benchmark: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads, glibc malloc "
      f"(MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')})")
    if add_gbs:
        w(f"in-place add bandwidth (x.add_(y), 12 B/element): {add_gbs:.1f} GB/s")
    w(f"{'set':11s} {'impl':22s} {'ms/step':>9s} {'GB/s':>7s} {'% add':>6s} {'vs fused':>8s} {'x ref':>7s}")
    for set_name in ("vit_b", "many_small"):
        fused = MEDIANS.get((set_name, "AdamW fused"))
        ref = MEDIANS.get((set_name, "AdamSPD reference"))
        for (s, impl), (sec, nbytes) in sorted(MEDIANS.items()):
            if s != set_name:
                continue
            gbs = nbytes / sec / 1e9
            w(f"{s:11s} {impl:22s} {sec * 1e3:9.2f} {gbs:7.1f} "
              f"{(100 * gbs / add_gbs) if add_gbs else float('nan'):6.1f} "
              f"{(sec / fused[0]) if fused else float('nan'):8.2f} {(ref[0] / sec) if ref else float('nan'):7.1f}")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

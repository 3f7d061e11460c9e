"""What the report and the sweeps measure: time, bandwidth, memory, state bytes, projections."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, List, Optional

import torch

from ..optim import AdamSPD
from ..stats import STAT_SCALE
from .lines import GraphReplay
from .machine import cpu_cores, cpu_model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable, device) -> float:
    """Seconds one call of ``fn`` takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bandwidth_gbs(device) -> float:
    """Device copy (CUDA) or in-place add (CPU), GB/s counting every byte read and written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    fn, nbytes = ((lambda: y.copy_(x)), 8 * n) if device.type == "cuda" else ((lambda: x.add_(y)), 12 * n)
    times = [time_once(fn, device) for _ in range(12)][2:]
    return nbytes / statistics.median(times) / 1e9


def peak_extra_mb(fn: Callable, device) -> Optional[float]:
    """The memory one call of ``fn`` allocates beyond what was held (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (CUDA: the allocator's view; CPU: Linux's MemAvailable,
    which counts the page cache the kernel would give back: the free page count alone moves
    with whatever files were read last, and so would the sizes a sweep reaches)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_cores()} cores, {torch.get_num_threads()} threads{_prefetch_note()})"


def _prefetch_note() -> str:
    """Which cache the CPU kernel's AVX-512 steps prefetch into, when it is loaded: their speed turns on it."""
    from .. import _cpu, cpu_prefetch

    return "" if _cpu.load_error() else f"; kernel prefetch into {cpu_prefetch.prefetch().upper()}"


def params_of(line) -> List[torch.Tensor]:
    """The params a line steps (optimizers, and the wrappers of ``spd_kernels.bench.lines``)."""
    inner = getattr(line, "opt", line)
    if hasattr(inner, "param_groups"):
        return [p for group in inner.param_groups for p in group["params"]]
    return list(inner.params)


def state_bytes_per_param(line, n_params: int) -> Optional[float]:
    """Bytes of optimizer state per param: every tensor in ``opt.state``, each storage once
    (bitsandbytes' states share their quantization maps), a tensor subclass by its inner tensors."""
    inner = getattr(line, "opt", line)
    state = getattr(inner, "state", None)
    if not isinstance(state, dict):
        return None
    seen, total = set(), 0

    def add(value: torch.Tensor) -> None:
        nonlocal total
        if hasattr(value, "__tensor_flatten__"):  # a tensor subclass (torchao's fp8 and 8-bit states)
            names, _ = value.__tensor_flatten__()
            for name in names:
                add(getattr(value, name))
            return
        key = (value.untyped_storage().data_ptr(), value.device)
        if key not in seen:
            seen.add(key)
            total += value.untyped_storage().nbytes()

    for entry in state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                add(value)
    return total / n_params


def projected_share(line, n_params: int) -> Optional[float]:
    """Share of the params whose tensor the last step projected (s > 0); None for lines that
    are not an ``AdamSPD`` step (AdamW, bitsandbytes, the compiled and kernels-only lines)."""
    if isinstance(line, GraphReplay):
        line = line.opt  # each replay rewrites the captured step's stats rows in place
    if not isinstance(line, AdamSPD):
        return None
    rows = line.last_step_stats()
    if not rows:
        return None
    params = list(rows)
    scales = torch.stack([rows[p][STAT_SCALE] for p in params]).tolist()  # one sync, untimed
    return sum(p.numel() for p, s in zip(params, scales) if s > 0) / n_params

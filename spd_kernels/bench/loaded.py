"""``python -m spd_kernels bench --loaded``: a small CPU step on a machine that is busy.

Training jobs share their machine (data loaders, other ranks, other users).
An OpenMP fork-join costs microseconds on idle cores but up to a scheduler
slice (milliseconds) when every core is already taken, so a step that wakes
threads for a few thousand elements can run 10-100x slower than on one
thread. This report starts another torch process multiplying matrices on every
core, then times, in interleaved rounds, the AdamSPD CPU step of a 16-tensor MLP with 1 thread and
with all threads (medians), and the same without the load. The CPU kernel
keeps such small buckets on the calling thread; the ratio ``loaded, all
threads / loaded, 1 thread`` is what this report shows.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch

from ..optim import AdamSPD

#: a 16-tensor MLP: 8 linear layers of width 64 (~29K params)
MLP_SHAPES: List[Tuple[int, ...]] = (
    [(64, 32), (64,)] + [(64, 64), (64,)] * 6 + [(10, 64), (10,)]
)


#: the load: another torch process multiplying matrices on every core (its OpenMP
#: workers spin between regions, as a data loader's or another rank's would)
_LOAD = "import torch\na = torch.randn(1000, 1000)\na @ a\nprint('ready', flush=True)\nwhile True:\n    a @ a\n"


def _start_load() -> List[subprocess.Popen]:
    load = subprocess.Popen([sys.executable, "-c", _LOAD], stdout=subprocess.PIPE, text=True)
    load.stdout.readline()  # torch imported, the cores taken
    time.sleep(0.2)
    return [load]


def _stop_load(spinners: List[subprocess.Popen]) -> None:
    for s in spinners:
        s.kill()
    for s in spinners:
        s.wait()


def _optimizer(seed: int = 0) -> AdamSPD:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in MLP_SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    pre = [p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for p in params]
    return AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl="cpu")


def _median_ms(opt: AdamSPD, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def child_main(steps: int = 200) -> None:
    """Run in a fresh process: ms/step with 1 and with all threads, as JSON on stdout."""
    all_threads = torch.get_num_threads()
    opt = _optimizer()
    for _ in range(20):  # warm-up: buckets, state
        opt.step()
    out = {}
    for _ in range(2):
        for threads in (1, all_threads):
            out[str(threads)] = _median_ms(opt, threads, steps)
    print(json.dumps({"threads": all_threads, **out}))


def _child(steps: int) -> Dict[str, float]:
    code = f"from spd_kernels.bench.loaded import child_main; child_main({steps})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rounds: int = 5, steps: int = 200) -> Dict[str, float]:
    """Median ms per step for (quiet | loaded) x (1 thread | all threads), interleaved rounds.

    Each sample is a fresh process started after the load (or with none), as a
    training job starts on a machine that is already busy: a process that set
    up its threads on idle cores does not show the effect.
    """
    samples: Dict[str, List[float]] = {}
    threads = 1
    for _ in range(rounds):
        for load in ("quiet", "loaded"):
            spinners = _start_load() if load == "loaded" else []
            try:
                got = _child(steps)
            finally:
                _stop_load(spinners)
            threads = got["threads"]
            samples.setdefault(f"{load}_1_thread_ms", []).append(got["1"])
            samples.setdefault(f"{load}_all_thread_ms", []).append(got[str(threads)])
    out = {key: statistics.median(values) for key, values in samples.items()}
    out["threads"] = float(threads)
    out["loaded_all_vs_1_thread"] = out["loaded_all_thread_ms"] / out["loaded_1_thread_ms"]
    return out


def format_report(result: Dict[str, float]) -> str:
    n = int(result["threads"])
    return "\n".join([
        f"AdamSPD CPU step, 16-tensor MLP ({sum(torch.Size(s).numel() for s in MLP_SHAPES)} params), "
        "median ms/step:",
        f"  quiet machine:  1 thread {result['quiet_1_thread_ms']:.3f}   {n} threads {result['quiet_all_thread_ms']:.3f}",
        f"  loaded (a torch matmul on {n} threads): 1 thread {result['loaded_1_thread_ms']:.3f}   "
        f"{n} threads {result['loaded_all_thread_ms']:.3f}",
        f"  loaded, {n} threads / 1 thread: {result['loaded_all_vs_1_thread']:.2f}x",
    ])

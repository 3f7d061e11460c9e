"""CPU microbenchmarks (pytest-benchmark): AdamSPD's compiled kernel vs
torch.optim.AdamW(fused=True) vs the reference loop, on vit_b and many_small, fp32.

    python -m pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds

GB/s counts the minimal bytes: 32 B/param for SPD (p, g, m, v, a in; p, m, v
out), 28 for AdamW; the in-place add (12 B/element) is the machine's bandwidth
reference, measured in the same run. Grads are fixed random tensors, so the
projection fires on the tensors where c < 0 (about half).
"""
from __future__ import annotations

import pytest
import torch

from spd_kernels import AdamSPD, _cpu
from spd_kernels.bench import param_sets

from .conftest import record

SETS = ["vit_b", "many_small"]
#: rounds per implementation: the reference is slow
ROUNDS = {"AdamSPD cpu kernel": 15, "AdamW fused": 15, "AdamSPD reference": 3}


def make(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def build(impl, params):
    if impl == "AdamW fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    pre = [p.detach() + 0.01 * torch.randn(p.shape) for p in params]
    kind = "cpu" if impl == "AdamSPD cpu kernel" else "reference"
    return AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl=kind)


def test_bandwidth_in_place_add(benchmark):
    n = 1 << 26  # 256 MB per tensor: far beyond the caches
    x, y = torch.randn(n), torch.randn(n)
    benchmark.pedantic(x.add_, args=(y,), rounds=15, warmup_rounds=2)
    record(benchmark, "bandwidth", "in-place add", 12 * n)


@pytest.mark.parametrize("impl", list(ROUNDS))
@pytest.mark.parametrize("set_name", SETS)
def test_step(benchmark, set_name, impl):
    if impl == "AdamSPD cpu kernel" and _cpu.load_error():
        pytest.skip(f"CPU kernel not built: {_cpu.load_error()}")
    shapes = param_sets.get(set_name)
    params = make(shapes)
    opt = build(impl, params)
    benchmark.pedantic(opt.step, rounds=ROUNDS[impl], warmup_rounds=1)
    per_param = 28 if impl == "AdamW fused" else 32
    record(benchmark, set_name, impl, per_param * param_sets.numel(shapes))

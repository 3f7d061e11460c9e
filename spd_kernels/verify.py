"""``python -m spd_kernels verify``: each backend here against the reference.

Fine-tunes a small MLP (anchored SPD) with an anchor-free LoRA-style adapter
on a synthetic regression task for N steps with ``AdamSPD(impl=backend)``. At
every step a twin copy of the params and state, synced from the backend's
before the step, takes the same gradients through ``reference_step``; the table
shows the worst relative error per state over all steps, how often the
projection fired, and PASS/FAIL against the stated tolerance. Exits 1 on any
FAIL.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import backends
from .optim import AdamSPD
from .reference import reference_step
from .stats import STAT_C

#: worst allowed relative error of params and moments after one step, per param dtype:
#: fp32 rounding for fp32; two units in the last place for bf16/fp16 (the
#: interpreter truncates where a GPU rounds to nearest, one unit each way)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


@dataclass
class Row:
    backend: str
    dtype: torch.dtype
    steps: int
    errors: Dict[str, float]
    fired: int
    total: int

    @property
    def passed(self) -> bool:
        tol = TOLERANCE[self.dtype]
        return all(e <= tol for e in self.errors.values()) and self.fired > 0


class TinyFineTune(torch.nn.Module):
    """An MLP (the "pre-trained" part) plus a rank-4 adapter on its last layer."""

    def __init__(self, width: int = 64, rank: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU()
        )
        self.head = torch.nn.Linear(width, 10)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, width) / width**0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(10, rank) * 0.01)

    def forward(self, x):
        h = self.body(x)
        return self.head(h) + h @ self.lora_a.t() @ self.lora_b.t()

    def groups(self):
        anchored = list(self.body.parameters()) + list(self.head.parameters())
        return [{"params": anchored}, {"params": [self.lora_a, self.lora_b], "pre": None}]


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    x, y = x.detach().float(), y.detach().float()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))


def run_backend(impl: str, dtype: torch.dtype, device: torch.device, steps: int, seed: int = 0) -> Row:
    torch.manual_seed(seed)
    model = TinyFineTune().to(device=device, dtype=dtype)
    x = torch.randn(256, 32, device=device, dtype=dtype)
    y = torch.randn(256, 10, device=device, dtype=dtype)
    opt = AdamSPD(model.groups(), lr=1e-2, weight_decay=1.0, impl=impl)
    errors = {key: 0.0 for key in STATE_KEYS}
    fired = total = 0
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        twins = [_twin(opt, group) for group in opt.param_groups]
        opt.step()
        stats = opt.last_step_stats()
        for group, twin in zip(opt.param_groups, twins):
            fired += sum(int(stats[p][STAT_C] < 0) for p in twin["owners"])
            total += len(twin["owners"])
            _run_twin(twin, group)
            for i, p in enumerate(twin["owners"]):
                errors["param"] = max(errors["param"], _rel_err(p, twin["params"][i]))
                for key, twin_key in (("exp_avg", "exp_avgs"), ("exp_avg_sq", "exp_avg_sqs")):
                    errors[key] = max(errors[key], _rel_err(opt.state[p][key], twin[twin_key][i]))
    return Row(impl, dtype, steps, errors, fired, total)


def _twin(opt: AdamSPD, group) -> dict:
    """Copies of the params with grads and their state, taken before the step."""
    params = [p for p in group["params"] if p.grad is not None]

    def moment(p, key):  # before the first step the state does not exist yet: zeros
        s = opt.state[p]
        return s[key].clone() if key in s else torch.zeros_like(p, dtype=torch.float32)

    return dict(
        owners=params,
        params=[p.detach().clone() for p in params],
        grads=[p.grad.clone() for p in params],
        exp_avgs=[moment(p, "exp_avg") for p in params],
        exp_avg_sqs=[moment(p, "exp_avg_sq") for p in params],
        max_exp_avg_sqs=[moment(p, "max_exp_avg_sq") for p in params] if group["amsgrad"] else None,
        anchors=None if group["anchor_free"] else [opt.state[p]["anchor"] for p in params],
        steps=[opt.state[p]["step"].clone().cpu() if "step" in opt.state[p] else torch.zeros(()) for p in params],
    )


def _run_twin(twin: dict, group) -> None:
    beta1, beta2 = group["betas"]
    reference_step(
        twin["params"], twin["grads"], twin["exp_avgs"], twin["exp_avg_sqs"], twin["max_exp_avg_sqs"],
        twin["anchors"], twin["steps"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
        weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
    )


def plan(device: torch.device) -> List[tuple]:
    """(backend, dtype) pairs that can run here."""
    rows = [("reference", torch.float32), ("reference", torch.bfloat16)]
    if device.type == "cpu" and not backends.cpu_kernel_error():
        rows += [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    if backends.triton_runs_on(device):
        rows += [("triton", torch.float32), ("triton", torch.bfloat16)]
    return rows


def format_table(rows: List[Row]) -> str:
    head = f"{'backend':10s} {'dtype':9s} {'steps':>5s} " + " ".join(f"{k:>11s}" for k in STATE_KEYS)
    head += f" {'projected':>11s} {'tolerance':>9s}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.backend:10s} {str(r.dtype).replace('torch.', ''):9s} {r.steps:5d} "
            + " ".join(f"{r.errors[k]:11.2e}" for k in STATE_KEYS)
            + f" {f'{r.fired}/{r.total}':>11s} {TOLERANCE[r.dtype]:9.1e}  {'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spd_kernels verify", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {device}, torch {torch.__version__}; worst relative error per state over {args.steps} steps")
    if device.type == "cpu" and backends.triton_runs_on(device):
        print("triton runs under TRITON_INTERPRET=1 (no GPU): the real kernels, slowly")
    rows = [run_backend(impl, dtype, device, args.steps) for impl, dtype in plan(device)]
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

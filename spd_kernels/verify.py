"""``python -m spd_kernels verify``: each backend here against the reference.

On CUDA it runs a realistic parameter set (vit_b by default, ``--set``) with
random grads of either sign of the condition; on a CPU (where Triton runs under
its slow interpreter) a small MLP (anchored SPD) with an anchor-free LoRA-style
adapter on a synthetic regression task, for N steps with ``AdamSPD(impl=backend)``. At
every step a twin copy of the params and state, synced from the backend's
before the step, takes the same gradients through ``reference_step``; the table
shows the worst relative error per state over all steps, how often the
projection fired, and PASS/FAIL against the stated tolerance. Exits 1 on any
FAIL. The moment-format rows run each backend in every compressed format it
declares (``spd_kernels.formats``; a compressed moment's tolerance is one code
of its format, its codes being compared after decoding). The ``split`` rows run each backend's split step (the one sharded params
take under FSDP2) on two halves of every tensor, adding the halves' sums where
the all-reduce would, against the reference on the whole tensors.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import backends
from . import formats as moment_formats
from .bench import param_sets
from .anchors import origin
from .bucket import Bucket
from .hyperparameters import Hyperparameters
from .optim import AdamSPD
from .reference import reference_step
from .stats import STAT_C
from .testing import PARAM_TOL, relative_error, signed_grad, two_shard_step

#: worst allowed relative error of params and moments after one step, per param
#: dtype: the relative tolerance of the one table in spd_kernels.testing
TOLERANCE = {dtype: tol["rtol"] for dtype, tol in PARAM_TOL.items()}
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
#: worst allowed relative error of a compressed moment (its decoded values): one code of its format
#: at the top of a block, where a value within rounding of a code boundary may round the other way
CODE_TOLERANCE = {"bf16": 2.0**-7, "fp8": 2.0**-3, "bnb8": 2.0**-5}
#: the optimizer settings of each moment-format row (min_8bit_size: the small run's tensors take them)
FORMAT_SETTINGS = {
    ("fp32", "fp32"): {},
    ("bf16", "bf16"): dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16),
    ("fp8", "bf16"): dict(exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16, min_8bit_size=1024),
    ("bnb8", "bnb8"): dict(optim_bits=8, min_8bit_size=1024),
}


@dataclass
class Row:
    backend: str
    dtype: torch.dtype
    steps: int
    errors: Dict[str, float]
    fired: int
    total: int
    #: the (exp_avg, exp_avg_sq) formats of the large tensors
    formats: tuple = ("fp32", "fp32")

    def tolerance(self, key: str) -> float:
        fmt = dict(zip(("exp_avg", "exp_avg_sq"), self.formats)).get(key, "fp32")
        return CODE_TOLERANCE[fmt] if fmt != "fp32" else TOLERANCE[self.dtype]

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerance(k) for k, e in self.errors.items()) and self.fired > 0


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


class ParamSetTask:
    """A parameter set (spd_kernels.bench.param_sets) with random grads: the realistic-size check.

    Each tensor's grad has a random sign of c = -sum(g (p - a)), well away from
    the tie, so both branches are taken on every step; the last quarter of the
    set is an anchor-free group (LoRA-like new params).
    """

    def __init__(self, name: str, device, dtype, seed: int, shapes=None):
        self.gen = torch.Generator(device=device).manual_seed(seed)
        shapes = shapes if shapes is not None else param_sets.get(name)
        self.params = [torch.nn.Parameter(torch.randn(s, device=device, generator=self.gen).to(dtype) * 0.02)
                       for s in shapes]
        cut = len(self.params) - len(self.params) // 4
        self.anchors = [(p.detach().float() + 0.01 * torch.randn(p.shape, device=device, generator=self.gen))
                        .to(dtype) for p in self.params[:cut]]
        self.cut = cut

    @classmethod
    def from_shapes(cls, shapes, device, dtype, seed: int) -> "ParamSetTask":
        return cls("", device, dtype, seed, shapes=shapes)

    def groups(self):
        return [{"params": self.params[: self.cut], "pre": self.anchors},
                {"params": self.params[self.cut:], "pre": None}]

    def backward(self):
        for i, p in enumerate(self.params):
            sign = 1.0 if torch.rand((), device=p.device, generator=self.gen) < 0.5 else -1.0
            p.grad = signed_grad(p, self.anchors[i] if i < self.cut else None, sign, self.gen)


class ModelTask:
    """The small fine-tuning run: an MLP plus an anchor-free adapter on random regression data."""

    def __init__(self, device, dtype, seed: int):
        torch.manual_seed(seed)
        self.model = TinyFineTune().to(device=device, dtype=dtype)
        self.x = torch.randn(256, 32, device=device, dtype=dtype)
        self.y = torch.randn(256, 10, device=device, dtype=dtype)

    def groups(self):
        return self.model.groups()

    def backward(self):
        for p in self.model.parameters():
            p.grad = None
        torch.nn.functional.mse_loss(self.model(self.x).float(), self.y.float()).backward()


def run_backend(impl: str, dtype: torch.dtype, device: torch.device, steps: int, seed: int = 0,
                param_set: str = "mlp", formats: tuple = ("fp32", "fp32")) -> Row:
    task = ModelTask(device, dtype, seed) if param_set == "mlp" else ParamSetTask(param_set, device, dtype, seed)
    opt = AdamSPD(task.groups(), lr=1e-2, weight_decay=1.0, impl=impl, **FORMAT_SETTINGS[formats])
    opt.pin_anchors()  # the twins need the anchors before the first step creates the state
    errors = {key: 0.0 for key in STATE_KEYS}
    fired = total = 0
    for _ in range(steps):
        task.backward()
        twins = [_twin(opt, group) for group in opt.param_groups]
        opt.step()
        stats = opt.last_step_stats()
        for group, twin in zip(opt.param_groups, twins):
            fired += sum(int(stats[p][STAT_C] < 0) for p in twin["owners"])
            total += len(twin["owners"])
            _run_twin(twin, group)
            for i, p in enumerate(twin["owners"]):
                errors["param"] = max(errors["param"], relative_error(p, twin["params"][i]))
                for k, key in enumerate(("exp_avg", "exp_avg_sq")):
                    errors[key] = max(errors[key], relative_error(_decoded(opt.state[p], k), _decoded(twin, k, i)))
    return Row(impl, dtype, steps, errors, fired, total, formats)


def _decoded(state: dict, moment: int, i: Optional[int] = None) -> torch.Tensor:
    """A moment's fp32 values: from a param's state, or (``i``) from entry i of a twin's lists."""
    if i is None:
        fmt = moment_formats.held(state, moment)
        return fmt.decode(*moment_formats.state_of(state, fmt, moment), moment).float()
    fmt = moment_formats.FORMATS[state["formats"][i][moment]]
    codes = state[("exp_avgs", "exp_avg_sqs")[moment]][i]
    scale = state[("exp_avg_scales", "exp_avg_sq_scales")[moment]][i]
    return fmt.decode(codes, scale, moment).float()


def _twin(opt: AdamSPD, group) -> dict:
    """Copies of the params with grads and their state, taken before the step."""
    positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
    params = [group["params"][i] for i in positions]

    def pair(p):  # before the first step the state does not exist yet: its group's formats
        held = [moment_formats.held(opt.state[p], k) for k in range(2)]
        chosen = moment_formats.for_tensor(p.numel(), group)
        return tuple(f.name for f in (held if held[0] is not None else chosen))

    def moment(p, k):
        fmt = moment_formats.FORMATS[pair(p)[k]]
        s = opt.state[p]
        if "step" in s:
            codes, scale = moment_formats.state_of(s, fmt, k)
            return codes.clone(), (scale.clone() if scale is not None else None)
        return fmt.zeros(p.detach(), k), (torch.zeros(-(-p.numel() // fmt.block), device=p.device)
                                           if fmt.block else None)

    ms, vs = [moment(p, 0) for p in params], [moment(p, 1) for p in params]
    return dict(
        owners=params,
        formats=[pair(p) for p in params],
        params=[p.detach().clone() for p in params],
        grads=[p.grad.clone() for p in params],
        exp_avgs=[m for m, _ in ms], exp_avg_scales=[sc for _, sc in ms],
        exp_avg_sqs=[v for v, _ in vs], exp_avg_sq_scales=[sc for _, sc in vs],
        max_exp_avg_sqs=[opt.state[p]["max_exp_avg_sq"].clone() if "max_exp_avg_sq" in opt.state[p]
                         else torch.zeros_like(p, dtype=torch.float32) for p in params] if group["amsgrad"] else None,
        anchors=None if group["anchor_free"] else [
            opt.state[p]["anchor"] if "anchor" in opt.state[p] else origin(group).anchors[i]  # given or pinned
            for i, p in zip(positions, params)],
        steps=[opt.state[p]["step"].clone().cpu() if "step" in opt.state[p] else torch.zeros(()) for p in params],
    )


def _run_twin(twin: dict, group) -> None:
    """The reference over the twin, one tensor at a time (its tensors may differ in format)."""
    hp = Hyperparameters.from_group(group)
    for i in range(len(twin["params"])):
        reference_step(
            twin["params"][i:i + 1], twin["grads"][i:i + 1], twin["exp_avgs"][i:i + 1], twin["exp_avg_sqs"][i:i + 1],
            twin["max_exp_avg_sqs"][i:i + 1] if twin["max_exp_avg_sqs"] else None,
            twin["anchors"][i:i + 1] if twin["anchors"] is not None else None, twin["steps"][i:i + 1], hp,
            exp_avg_scales=twin["exp_avg_scales"][i:i + 1], exp_avg_sq_scales=twin["exp_avg_sq_scales"][i:i + 1],
            formats=twin["formats"][i],
        )


def run_split(impl: str, dtype: torch.dtype, device: torch.device, steps: int, seed: int = 0,
              param_set: str = "mlp") -> Row:
    """The split step of ``impl`` on two shards per tensor against the reference, one step at a time."""
    shapes = ([tuple(p.shape) for p in TinyFineTune().parameters()] if param_set == "mlp"
              else param_sets.get(param_set))
    task = ParamSetTask.from_shapes(shapes, device, dtype, seed)
    backend = backends.get(impl)
    state = dict(
        params=[p.detach() for p in task.params[: task.cut]], anchors=list(task.anchors),
        exp_avgs=[torch.zeros(s, device=device) for s in shapes[: task.cut]],
        exp_avg_sqs=[torch.zeros(s, device=device) for s in shapes[: task.cut]],
        steps=[torch.zeros((), device=device if backend.step_on_device else "cpu") for _ in shapes[: task.cut]],
    )
    hp = Hyperparameters(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1.0)
    split = two_shard_step(backend.start)
    errors = {key: 0.0 for key in STATE_KEYS}
    fired = total = 0
    for _ in range(steps):
        task.backward()
        grads = [p.grad for p in task.params[: task.cut]]
        want = {key: [t.clone() for t in value] for key, value in state.items()}
        want["steps"] = [s.cpu() for s in want["steps"]]
        reference_step(grads=grads, max_exp_avg_sqs=None, **want, hp=hp)
        try:
            stats = split(Bucket(grads=grads, **state, hp=hp))
        except AssertionError:  # the shards disagree: the sums were not combined as the all-reduce would
            errors = {key: math.inf for key in STATE_KEYS}
            break
        fired += int((stats[:, STAT_C] < 0).sum())
        total += len(grads)
        for key, name in (("param", "params"), ("exp_avg", "exp_avgs"), ("exp_avg_sq", "exp_avg_sqs")):
            errors[key] = max([errors[key]] + [relative_error(x, y) for x, y in zip(state[name], want[name])])
        for name in ("params", "exp_avgs", "exp_avg_sqs"):  # one step's function: start the next from ours
            for x, y in zip(state[name], want[name]):
                y.copy_(x)
    return Row(f"{impl} split", dtype, steps, errors, fired, total)


def plan(device: torch.device) -> List[tuple]:
    """(backend, dtype) pairs that can run here: every available backend, in fp32 and bf16."""
    return [(name, dtype) for name in reversed(backends.available(device))
            for dtype in (torch.float32, torch.bfloat16)]


def format_plan(device: torch.device) -> List[tuple]:
    """(backend, moment formats) of every compressed format each available backend runs (fp32 params)."""
    return [(name, pair) for name in reversed(backends.available(device)) for pair in FORMAT_SETTINGS
            if pair != ("fp32", "fp32") and not backends.get(name).format_error(pair)]


def _tolerances(r: Row) -> str:
    param, moments = r.tolerance("param"), max(r.tolerance("exp_avg"), r.tolerance("exp_avg_sq"))
    return f"{param:.1e}" + (f" ({moments:.1e})" if moments != param else "")


def format_table(rows: List[Row]) -> str:
    head = f"{'backend':16s} {'dtype':9s} {'moments':9s} {'steps':>5s} " + " ".join(f"{k:>11s}" for k in STATE_KEYS)
    head += f" {'projected':>11s} {'tolerance (moments)':>19s}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.backend:16s} {str(r.dtype).replace('torch.', ''):9s} {'/'.join(dict.fromkeys(r.formats)):9s} "
            f"{r.steps:5d} " + " ".join(f"{r.errors[k]:11.2e}" for k in STATE_KEYS)
            + f" {f'{r.fired}/{r.total}':>11s} {_tolerances(r):>19s}  {'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m spd_kernels verify`` (every option documented)."""
    parser = argparse.ArgumentParser(prog="python -m spd_kernels verify", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per backend (default 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda when there is a GPU, else cpu)")
    parser.add_argument(
        "--set", dest="param_set", default=None, choices=("mlp", *param_sets.NAMES),
        help="'mlp' (the small fine-tuning run) or a parameter set of spd_kernels.bench.param_sets "
             f"({', '.join(param_sets.NAMES)}) with random grads; default vit_b on CUDA, mlp on CPU "
             "(where Triton runs under its slow interpreter)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    param_set = args.param_set or ("vit_b" if device.type == "cuda" else "mlp")
    print(f"device: {device}, torch {torch.__version__}; set {param_set}; "
          f"worst relative error per state over {args.steps} steps")
    if device.type == "cpu" and "triton" in backends.available(device):
        print("triton runs under TRITON_INTERPRET=1 (no GPU): the real kernels, slowly")
    rows = [run_backend(impl, dtype, device, args.steps, param_set=param_set) for impl, dtype in plan(device)]
    rows += [run_backend(impl, torch.float32, device, args.steps, param_set=param_set, formats=pair)
             for impl, pair in format_plan(device)]
    rows += [run_split(impl, dtype, device, args.steps, param_set=param_set) for impl, dtype in plan(device)]
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

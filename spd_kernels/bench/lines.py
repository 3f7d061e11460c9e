"""The bench's lines: one record each, saying how the line is built and how many bytes a step moves.

A line is something with a ``step()`` over its own params, grads and state:
an optimizer, or one of the wrappers below that times part of AdamSPD's step.
``LINES`` is the registry the report, the sweeps and the tests read; a new line
is one record here.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import backends
from ..optim import AdamSPD


@dataclass(frozen=True)
class Line:
    name: str
    #: what the report's docstring says of it
    what: str
    #: ``make(params, pre, anchors, device)`` -> the stepper; ``pre`` is None for an anchor-free set
    make: Callable
    #: the fewest bytes one step moves per fp32 param, with an anchor: read p, g, moments (and the
    #: anchor); write p and moments. AdamW 28; SPD 32 (fp32 anchor), 30 (bf16), 22 (bf16 moments,
    #: bf16 anchor), 20 (fp8 m, bf16 v), 18 (8-bit); per-block scales (4 B per 256) not counted
    step_bytes_anchored: int
    #: of those, the anchor's read (not moved on an anchor-free set)
    anchor_bytes: int = 0
    #: which report lines it belongs to: 'default', or a flag's: 'formats', 'kernels', 'graph'
    kind: str = "default"
    #: what it needs here: 'fast' (a fused AdamSPD backend), 'cuda', 'bitsandbytes', 'torchao', or ''
    needs: str = ""
    #: whether its step is an AdamSPD step whose projections the report counts
    counts_projections: bool = False
    #: the moment formats its AdamSPD runs (``spd_kernels.formats``): 'fast' lines need a fused backend
    #: that runs them
    moment_formats: tuple = ("fp32",)

    def step_bytes(self, anchored: bool) -> int:
        return self.step_bytes_anchored - (0 if anchored else self.anchor_bytes)

    @property
    def projects(self) -> bool:
        """Whether it is an SPD step, which may run the projection pass: the lines that read an anchor."""
        return self.anchor_bytes > 0

    def projection_bytes(self, anchored: bool) -> int:
        """What SPD's projection pass moves per projected fp32 param: p read and written again,
        and the anchor read again (an anchor-free set projects toward 0: no anchor)."""
        return 8 + (self.anchor_bytes if anchored else 0)


def fast_backend(device: torch.device, moment_formats: Sequence[str] = ("fp32",)) -> str:
    """The backend ``impl='auto'`` runs fp32 params with moments in ``moment_formats`` on here
    ('reference' when no fused one can)."""
    pair = (moment_formats[0], moment_formats[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing kernel shows as the absent 'spd' line instead
        return backends.choose("auto", torch.empty(1, device=device), None, pair).name


def _spd_tensor_step(p, g, m, v, a, step, lr: float, beta1: float, beta2: float, eps: float, lam: float):
    """One tensor's SPD step in plain torch ops with no host sync (what torch.compile sees)."""
    step += 1
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    q = p - (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps)
    d, e = p - a, q - a
    c = -(g * d).sum()
    npa, nqa = torch.linalg.vector_norm(d), torch.linalg.vector_norm(e)
    r = torch.where(nqa > 0, ((nqa - npa) / nqa).clamp(0, 1), torch.zeros_like(nqa))
    s = torch.where(c < 0, lam * r, torch.zeros_like(r))
    p.copy_(q - s * e)


class CompiledSPD:
    """Per-tensor SPD under torch.compile (dynamic shapes: one graph for all tensors)."""

    def __init__(self, params, anchors, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1.0):
        self.params = params
        self.hp = (lr, betas[0], betas[1], eps, weight_decay)
        self.fn = torch.compile(_spd_tensor_step, dynamic=True)
        self.state = [
            (torch.zeros_like(p), torch.zeros_like(p), a if a is not None else torch.zeros_like(p),
             torch.zeros((), device=p.device))
            for p, a in zip(params, anchors)
        ]

    @torch.no_grad()
    def step(self):
        for p, (m, v, a, step) in zip(self.params, self.state):
            self.fn(p.view(-1), p.grad.view(-1), m.view(-1), v.view(-1), a.view(-1), step, *self.hp)


class KernelsOnly:
    """The fast backend's entry point on the buckets an ``AdamSPD`` built (after one step), through
    ``AdamSPD.buckets()``: the kernels and their launch, without ``step()``'s checks and bookkeeping."""

    def __init__(self, opt: AdamSPD, split: bool) -> None:
        self.opt = opt  # owns the params and state the buckets point at
        opt.step()  # builds the buckets and the state
        # pointed at the params' grads, which the bench then changes in place only
        self.work = opt.buckets()
        self.split = split
        if split:
            for _, bucket in self.work:
                bucket.sums = torch.zeros((len(bucket), 3), dtype=torch.float64, device=bucket.device)

    def step(self) -> None:
        for backend, bucket in self.work:
            if self.split:
                backend.start(bucket)()  # where FSDP2 would all-reduce bucket.sums in between
            else:
                backend.run(bucket)


class GraphReplay:
    """``opt.step()`` captured once in a CUDA graph; each step replays it (torch's capturable recipe)."""

    def __init__(self, opt: AdamSPD) -> None:
        # the graph holds raw addresses: the optimizer (params, state, tables) must outlive it
        self.opt = opt
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream: tables, lazy state
            opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()

    def step(self) -> None:
        self.graph.replay()


def _spd(**options):
    def make(params, pre, anchors, device):
        return AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl=fast_backend(device),
                       **options)
    return make


def _torchao_fp8(params, pre, anchors, device):
    from torchao.optim import AdamWFp8

    return AdamWFp8(params, lr=1e-3, weight_decay=0.01)


def _bnb(params, pre, anchors, device):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=1e-3, weight_decay=0.01)


LINES: Dict[str, Line] = {line.name: line for line in (
    Line("spd", "AdamSPD with this machine's fast backend (triton on CUDA, cpu on CPU)", _spd(), 32, 4,
         needs="fast", counts_projections=True),
    Line("spd_reference", "AdamSPD(impl='reference'): the per-tensor oracle loop",
         lambda params, pre, anchors, device: AdamSPD([{"params": params, "pre": pre}], lr=1e-3,
                                                      weight_decay=1.0, impl="reference"),
         32, 4, counts_projections=True),
    Line("adamw_fused", "torch.optim.AdamW(fused=True)",
         lambda params, pre, anchors, device: torch.optim.AdamW(params, lr=1e-3, fused=True), 28),
    Line("adamw_foreach", "torch.optim.AdamW(foreach=True)",
         lambda params, pre, anchors, device: torch.optim.AdamW(params, lr=1e-3, foreach=True), 28),
    Line("spd_compiled", "the per-tensor SPD step a user would write, under torch.compile",
         lambda params, pre, anchors, device: CompiledSPD(params, anchors), 32, 4),
    Line("spd_bf16a", "AdamSPD with bf16 anchors (anchor_dtype=torch.bfloat16)",
         _spd(anchor_dtype=torch.bfloat16), 30, 2, kind="formats", needs="fast", counts_projections=True),
    Line("spd_8bit", "AdamSPD with 8-bit moments and bf16 anchors (optim_bits=8)",
         _spd(anchor_dtype=torch.bfloat16, optim_bits=8), 18, 2, kind="formats", needs="fast",
         counts_projections=True, moment_formats=("bnb8",)),
    Line("spd_bf16", "AdamSPD with bf16 moments and bf16 anchors (exp_avg_dtype=exp_avg_sq_dtype=torch.bfloat16)",
         _spd(anchor_dtype=torch.bfloat16, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16), 22, 2,
         kind="formats", needs="fast", counts_projections=True, moment_formats=("bf16",)),
    Line("spd_fp8", "AdamSPD with fp8 first and bf16 second moments, bf16 anchors "
         "(exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16)",
         _spd(anchor_dtype=torch.bfloat16, exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16),
         20, 2, kind="formats", needs="fast", counts_projections=True, moment_formats=("fp8", "bf16")),
    Line("adamw_8bit_bnb", "bitsandbytes' AdamW8bit (when bitsandbytes is installed)", _bnb, 16,
         kind="formats", needs="bitsandbytes"),
    Line("adamw_fp8_torchao", "torchao's AdamWFp8 (fp8 e4m3 moments; when torchao is installed)", _torchao_fp8, 16,
         kind="formats", needs="torchao"),
    Line("spd_kernels", "the fast backend's whole step on AdamSPD's own bucket, without step()'s bookkeeping",
         lambda params, pre, anchors, device: KernelsOnly(_spd()(params, pre, anchors, device), split=False),
         32, 4, kind="kernels", needs="fast"),
    Line("spd_split", "the fast backend's split step (the one FSDP2 shards take) on that bucket, no collective",
         lambda params, pre, anchors, device: KernelsOnly(_spd()(params, pre, anchors, device), split=True),
         32, 4, kind="kernels", needs="fast"),
    Line("spd_graph", "AdamSPD(capturable=True).step() captured in a CUDA graph, replayed (CUDA only)",
         lambda params, pre, anchors, device: GraphReplay(_spd(capturable=True)(params, pre, anchors, device)),
         32, 4, kind="graph", needs="cuda", counts_projections=True),
)}

#: the report's lines by kind: the default ones, and those a flag adds
DEFAULT = tuple(n for n, line in LINES.items() if line.kind == "default")
FORMATS = tuple(n for n, line in LINES.items() if line.kind == "formats")
KERNELS = tuple(n for n, line in LINES.items() if line.kind == "kernels")
GRAPH = tuple(n for n, line in LINES.items() if line.kind == "graph")


def can_run(name: str, device: torch.device) -> bool:
    needs = LINES[name].needs
    if needs == "fast":
        return fast_backend(device, LINES[name].moment_formats) != "reference"
    if needs == "cuda":
        return device.type == "cuda"
    if needs in ("bitsandbytes", "torchao"):
        return importlib.util.find_spec(needs) is not None
    return True


def available(device: torch.device, names: Sequence[str] = DEFAULT) -> List[str]:
    """The lines of ``names`` that can run on ``device`` here."""
    return [name for name in names if can_run(name, device)]


def build(name: str, shapes, device: torch.device, anchored: bool, seed: int = 0):
    """Line ``name`` on fresh params of ``shapes`` (random, with grads), anchored near them or anchor-free."""
    if name not in LINES:
        raise ValueError(f"unknown line {name!r}; choose from {tuple(LINES)}")
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-2
    anchors: List[Optional[torch.Tensor]] = (
        [p.detach() + 0.01 * torch.randn(p.shape, device=device, generator=gen) for p in params]
        if anchored else [None] * len(params))
    return LINES[name].make(params, anchors if anchored else None, anchors, device)

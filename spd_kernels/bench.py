"""``python -m spd_kernels bench``: the microbenchmark report.

For each parameter set (vit_b, a llama-like set sized to the device's memory,
many_small, lora anchor-free) every implementation gets its own copy of the
params, grads and state; then rounds run them interleaved (A B C A B C ...)
after a warm-up, and the table shows per implementation the median ms/step,
the ratio to ``torch.optim.AdamW(fused=True)``, the effective GB/s at each
line's minimal byte count (``STEP_BYTES``: 32 B/param for SPD with fp32
anchors, 28 for AdamW, ...), that rate as % of the bandwidth measured in the
same run (a device copy on CUDA, an in-place add on CPU), the peak extra
memory of one step (CUDA only) and the optimizer state's bytes per param.
Writes the same figures as JSON, CSV and a PNG plot.

Implementations:
    spd            AdamSPD with this machine's fast backend (triton on CUDA, cpu on CPU)
    spd_reference  AdamSPD(impl='reference'): the per-tensor oracle loop
    adamw_fused    torch.optim.AdamW(fused=True)
    adamw_foreach  torch.optim.AdamW(foreach=True)
    spd_compiled   the per-tensor SPD step a user would write, under torch.compile
and, on request (``--state-formats``, ``--kernels-only``, ``--cuda-graph`` or ``--impls``):
    spd_bf16a      AdamSPD with bf16 anchors (anchor_dtype=torch.bfloat16)
    spd_8bit       AdamSPD with 8-bit moments and bf16 anchors (optim_bits=8)
    adamw_8bit_bnb bitsandbytes' AdamW8bit (when bitsandbytes is installed)
    spd_kernels    the fast backend's whole step on AdamSPD's own bucket, without step()'s bookkeeping
    spd_split      the fast backend's split step (the one FSDP2 shards take) on that bucket, no collective
    spd_graph      AdamSPD(capturable=True).step() captured in a CUDA graph, replayed (CUDA only)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import backends, param_sets
from .optim import AdamSPD
from .stats import STAT_SCALE

#: the report's default lines
IMPLS = ("spd", "spd_reference", "adamw_fused", "adamw_foreach", "spd_compiled")
#: lines added on request: the state formats (memory), and where the time of a step goes
FORMAT_IMPLS = ("spd_bf16a", "spd_8bit", "adamw_8bit_bnb")
KERNEL_IMPLS = ("spd_kernels", "spd_split")
GRAPH_IMPLS = ("spd_graph",)
ALL_IMPLS = IMPLS + FORMAT_IMPLS + KERNEL_IMPLS + GRAPH_IMPLS

#: the fewest bytes a step must move per param (fp32 params): read p, g, moments, anchor; write
#: p and moments. AdamW 28; SPD 32 (fp32 anchor), 30 (bf16 anchor), 18 (8-bit moments, bf16 anchor)
STEP_BYTES = {"adamw": 28, "spd": 32, "spd_bf16a": 30, "spd_8bit": 18, "adamw_8bit_bnb": 16}
SETS = param_sets.NAMES


@dataclass
class Row:
    set: str
    impl: str
    tensors: int
    params_m: float
    ms: float
    vs_adamw_fused: float
    gbs: float
    pct_bandwidth: float
    peak_extra_mb: Optional[float]
    #: optimizer state (moments, anchors, absmax, steps) in bytes per param, each storage counted once
    state_bytes_per_param: Optional[float] = None
    #: AdamSPD lines: % of the params whose tensor SPD projected (s > 0), mean over the timed
    #: steps. ``gbs`` counts one pass (``STEP_BYTES``); a projected tensor that does not stay in
    #: cache is read and written again (p and anchor in, p out: up to 12 B/param more)
    projected_pct: Optional[float] = None


# ------------------------------------------------------------------ the sets


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


def sized_shapes(name: str, device: torch.device, n_impls: int, small: bool) -> List[tuple]:
    if small:  # CI: the same structure, tiny
        return {
            "vit_b": param_sets.vit_b()[:12],
            "llama_like": [(512, 64), (64, 64), (128, 64), (64, 128), (64,), (512, 64)],
            "many_small": param_sets.many_small(50, 256),
            "lora": param_sets.lora(layers=2, width=64, rank=4),
        }[name]
    if name != "llama_like":
        return param_sets.get(name)
    # every implementation holds p, g, m, v (and a): keep all of them within ~40% of memory
    budget = 0.4 * free_memory(device) / (20 * n_impls)
    layers, vocab = 16, 32000
    while layers > 1 and param_sets.numel(param_sets.llama_like(layers, vocab)) > budget:
        layers //= 2
    while vocab > 1000 and param_sets.numel(param_sets.llama_like(layers, vocab)) > budget:
        vocab //= 2
    return param_sets.llama_like(layers, vocab)


# -------------------------------------------------------- the implementations


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
    """The fast backend's entry point on the buckets an ``AdamSPD`` built (after one step):
    the kernels and their launch, without ``step()``'s checks and bookkeeping."""

    def __init__(self, opt: AdamSPD, split: bool) -> None:
        self.opt = opt  # owns the params and state the buckets point at
        opt.step()  # builds the buckets and the state
        self.work = opt.buckets()
        if split:
            for _, bucket in self.work:
                bucket.sums = torch.zeros((len(bucket), 3), dtype=torch.float64, device=bucket.device)
        self.split = split

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


def build(impl: str, shapes, device, anchored: bool, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-2
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, device=device, generator=gen) for p in params] \
        if anchored else [None] * len(params)
    pre = anchors if anchored else None
    if impl in ("spd_bf16a", "spd_8bit"):
        return AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl=fast_backend(device),
                       anchor_dtype=torch.bfloat16, optim_bits=8 if impl == "spd_8bit" else 32)
    if impl == "adamw_8bit_bnb":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-3, weight_decay=0.01)
    if impl in ("spd", *KERNEL_IMPLS, *GRAPH_IMPLS):
        opt = AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl=fast_backend(device),
                      capturable=impl in GRAPH_IMPLS)
        if impl in KERNEL_IMPLS:
            return KernelsOnly(opt, split=impl == "spd_split")
        return GraphReplay(opt) if impl in GRAPH_IMPLS else opt
    if impl == "spd_reference":
        return AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl="reference")
    if impl == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if impl == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if impl == "spd_compiled":
        return CompiledSPD(params, anchors)
    raise ValueError(f"unknown impl {impl!r}; choose from {ALL_IMPLS}")


def fast_backend(device: torch.device) -> str:
    """The backend ``impl='auto'`` runs fp32 params on here ('reference' when no fused one can)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing kernel shows as the absent 'spd' line instead
        return backends.choose("auto", torch.empty(1, device=device), None).name


def _bitsandbytes_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def available_impls(device: torch.device, impls=IMPLS) -> List[str]:
    """The lines of ``impls`` that can run on ``device`` here."""
    fast = fast_backend(device) != "reference"
    return [i for i in impls
            if (i not in ("spd", "spd_bf16a", "spd_8bit", *KERNEL_IMPLS) or fast)
            and (i not in GRAPH_IMPLS or device.type == "cuda")
            and (i != "adamw_8bit_bnb" or _bitsandbytes_importable())]


def params_of(opt) -> List[torch.Tensor]:
    """The params an implementation steps (optimizers, and the wrappers above)."""
    inner = getattr(opt, "opt", opt)
    if hasattr(inner, "param_groups"):
        return [p for group in inner.param_groups for p in group["params"]]
    return list(inner.params)


def state_bytes_per_param(opt, n_params: int) -> Optional[float]:
    """Bytes of optimizer state per param: every tensor in ``opt.state``, each storage once
    (bitsandbytes' states share their quantization maps)."""
    inner = getattr(opt, "opt", opt)
    state = getattr(inner, "state", None)
    if not isinstance(state, dict):
        return None
    seen, total = set(), 0
    for entry in state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.device)
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total / n_params


# --------------------------------------------------------------- measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_gbs(device) -> float:
    """Device copy (CUDA) or in-place add (CPU), GB/s counting every byte read and written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    fn, nbytes = ((lambda: y.copy_(x)), 8 * n) if device.type == "cuda" else ((lambda: x.add_(y)), 12 * n)
    times = [_time_once(fn, device) for _ in range(12)][2:]
    return nbytes / statistics.median(times) / 1e9


def _time_once(fn: Callable, device) -> float:
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


def peak_extra_mb(fn: Callable, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def projected_share(opt, n_params: int) -> Optional[float]:
    """Share of the params whose tensor the last step projected (s > 0); None for lines that
    are not an ``AdamSPD`` step (AdamW, bitsandbytes, the compiled and kernels-only lines)."""
    if isinstance(opt, GraphReplay):
        opt = opt.opt  # each replay rewrites the captured step's stats rows in place
    if not isinstance(opt, AdamSPD):
        return None
    rows = opt.last_step_stats()
    if not rows:
        return None
    params = list(rows)
    scales = torch.stack([rows[p][STAT_SCALE] for p in params]).tolist()  # one sync, untimed
    return sum(p.numel() for p, s in zip(params, scales) if s > 0) / n_params


def step_bytes(impl: str, anchored: bool) -> int:
    """The minimal bytes one step moves per fp32 param (``STEP_BYTES``); no anchor read without anchors."""
    if impl in STEP_BYTES:
        per_param = STEP_BYTES[impl]
    else:
        per_param = STEP_BYTES["adamw" if impl.startswith("adamw") else "spd"]
    if not anchored and impl in ("spd_bf16a", "spd_8bit"):
        return per_param - 2
    if not anchored and not impl.startswith("adamw"):
        return per_param - 4
    return per_param


def bench_set(name, shapes, impls, device, rounds, warmup, bw, progress, fresh_grads=False) -> List[Row]:
    anchored = name != "lora"
    opts = {impl: build(impl, shapes, device, anchored) for impl in impls}
    for impl, opt in opts.items():  # warm-up: compiles, tables, lazy state
        for _ in range(warmup if impl != "spd_reference" else 1):
            opt.step()
            progress()
    _sync(device)
    peaks = {impl: peak_extra_mb(opt.step, device) for impl, opt in opts.items()}
    times: Dict[str, List[float]] = {impl: [] for impl in impls}
    projected: Dict[str, List[float]] = {impl: [] for impl in impls}
    n = param_sets.numel(shapes)
    for r in range(rounds):
        for impl, opt in opts.items():  # interleaved: drift and noise hit every impl alike
            if impl == "spd_reference" and r >= max(3, rounds // 4):
                continue  # the oracle is slow and its ratio needs no more precision
            if fresh_grads:  # new grads, untimed: SPD's condition then fires at a realistic rate
                for p in params_of(opt):
                    p.grad.normal_(0.0, 1e-2)
            times[impl].append(_time_once(opt.step, device))
            share = projected_share(opt, n)
            if share is not None:
                projected[impl].append(share)
            progress()
    fused = statistics.median(times["adamw_fused"]) if times.get("adamw_fused") else None
    rows = []
    for impl in impls:
        sec = statistics.median(times[impl])
        per_param = step_bytes(impl, anchored)
        gbs = n * per_param / sec / 1e9
        rows.append(Row(name, impl, len(shapes), n / 1e6, sec * 1e3, sec / fused if fused else float("nan"),
                        gbs, 100 * gbs / bw, peaks[impl], state_bytes_per_param(opts[impl], n),
                        100 * statistics.mean(projected[impl]) if projected[impl] else None))
    del opts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------- output


def format_table(rows: List[Row]) -> str:
    head = (f"{'set':11s} {'impl':14s} {'tensors':>7s} {'params':>8s} {'ms/step':>9s} {'vs fused':>8s} "
            f"{'GB/s':>7s} {'% bw':>6s} {'peak MB':>8s} {'state B/p':>9s} {'proj %':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_extra_mb:8.1f}" if r.peak_extra_mb is not None else f"{'-':>8s}"
        state = f"{r.state_bytes_per_param:9.2f}" if r.state_bytes_per_param is not None else f"{'-':>9s}"
        projected = f"{r.projected_pct:6.1f}" if r.projected_pct is not None else f"{'-':>6s}"
        lines.append(f"{r.set:11s} {r.impl:14s} {r.tensors:7d} {r.params_m:7.1f}M {r.ms:9.3f} "
                     f"{r.vs_adamw_fused:8.2f} {r.gbs:7.1f} {r.pct_bandwidth:6.1f} {peak} {state} {projected}")
    return "\n".join(lines)


def write_outputs(rows: List[Row], meta: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in ("bench.json", "bench.csv", "bench.png")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(rows, meta, paths[2])
    return paths


def plot_title(meta: dict) -> str:
    """The PNG's title: the machine, torch, and whether the sets were the tiny ``--small`` ones."""
    sizes = "--small (tiny sets)" if meta.get("small") else "full-size sets"
    return f"AdamSPD bench: {meta['device_name']}, torch {meta['torch']}, {sizes}"


def plot(rows: List[Row], meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r.set for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs, ms, pct = [], [], []
        for i, s in enumerate(sets):
            row = next((r for r in rows if r.set == s and r.impl == impl), None)
            if row is not None:
                xs.append(i + k * width)
                ms.append(row.vs_adamw_fused)
                pct.append(row.pct_bandwidth)
        axes[0].bar(xs, ms, width, label=impl)
        axes[1].bar(xs, pct, width, label=impl)
    for ax, title in zip(axes, ("step time / AdamW(fused) (log; lower is better)", "% of measured bandwidth")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))])
        ax.set_xticklabels(sets)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[1].legend(fontsize=8)
    fig.suptitle(plot_title(meta))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .machine import cpu_cores, cpu_model

    return f"{cpu_model()} ({cpu_cores()} cores, {torch.get_num_threads()} threads)"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m spd_kernels bench`` (every option documented)."""
    parser = argparse.ArgumentParser(prog="python -m spd_kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--sets", default=",".join(SETS),
                        help=f"comma-separated parameter sets, from {','.join(SETS)} (default: all)")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated lines from {','.join(ALL_IMPLS)} (default: "
                             f"{','.join(IMPLS)}, those that run here; adamw_fused is always added, "
                             "as every ratio needs it)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30 CUDA, 7 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones (default 3)")
    parser.add_argument("--state-formats", action="store_true",
                        help="add the spd_bf16a, spd_8bit and adamw_8bit_bnb lines (bf16 anchors, 8-bit "
                             "moments, bitsandbytes' AdamW8bit); the state bytes per param column compares them")
    parser.add_argument("--fresh-grads", action="store_true",
                        help="draw new random grads before every timed step (untimed), so SPD's condition "
                             "fires at a realistic rate; default: the same grads every step")
    parser.add_argument("--kernels-only", action="store_true",
                        help="add the spd_kernels and spd_split lines: the fast backend's whole and split "
                             "step on AdamSPD's bucket, without step()'s bookkeeping")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="add the spd_graph line: AdamSPD(capturable=True).step() replayed from a CUDA graph")
    parser.add_argument("--small", action="store_true",
                        help="tiny versions of the sets (for CI; the PNG title says so)")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json, bench.csv, bench.png")
    parser.add_argument("--sweep", choices=("size", "count"), default=None,
                        help="instead of the report: how a step's time grows with total params ('size', "
                             "transformer-shaped sets from 1M up to what fits) or with the number of tensors "
                             "('count', a fixed total split 10 ... 20,000 ways); every line per point, "
                             "interleaved; writes sweep-<kind>.json/.csv/.png (spd_kernels.sweep)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="with --sweep: start no new point after this many seconds (the first always "
                             "runs); the outputs are rewritten after every point either way")
    parser.add_argument("--loaded", action="store_true",
                        help="instead of the report: a 16-tensor MLP's CPU step with 1 and all threads, on a "
                             "quiet machine and with every core busy (spd_kernels.bench_loaded)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.loaded:
        from .bench_loaded import format_report, measure

        print(format_report(measure(rounds=args.rounds or 5)))
        return 0
    if args.sweep:
        from . import sweep

        device = torch.device(args.device)
        return sweep.main(args.sweep, device, args.small, args.rounds or (10 if device.type == "cuda" else 5),
                          args.warmup, args.out, budget_s=args.budget_s)
    bad_sets = [s for s in args.sets.split(",") if s not in SETS]
    if bad_sets:
        parser.error(f"--sets: unknown set(s) {bad_sets}; choose from {','.join(SETS)}")
    device = torch.device(args.device)
    impls = args.impls.split(",") if args.impls else available_impls(device)
    unknown = [i for i in impls if i not in ALL_IMPLS]
    if unknown:
        parser.error(f"unknown impls {unknown}; choose from {ALL_IMPLS}")
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device")
    requested = ((available_impls(device, FORMAT_IMPLS) if args.state_formats else [])
                 + list(KERNEL_IMPLS if args.kernels_only else ()) + list(GRAPH_IMPLS if args.cuda_graph else ()))
    impls += [i for i in requested if i not in impls]
    if "adamw_fused" not in impls:
        impls.append("adamw_fused")  # the baseline every ratio needs
    cannot = [i for i in impls if i not in available_impls(device, ALL_IMPLS)]
    if cannot:
        parser.error(f"{cannot} cannot run on {device} here")
    sets = args.sets.split(",")
    rounds = args.rounds or (30 if device.type == "cuda" else 7)
    from tqdm import tqdm

    bw = bandwidth_gbs(device)
    meta = dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                bandwidth_gbs=bw, bandwidth_kind="copy" if device.type == "cuda" else "in-place add",
                rounds=rounds, small=args.small, fresh_grads=args.fresh_grads, date=time.strftime("%Y-%m-%d"))
    print(f"{meta['device_name']}, torch {torch.__version__}; {meta['bandwidth_kind']} bandwidth {bw:.1f} GB/s")
    rows: List[Row] = []
    total = len(sets) * len(impls) * (rounds + args.warmup)
    with tqdm(total=total, desc="bench", unit="step", file=sys.stderr, disable=None) as bar:
        for name in sets:
            shapes = sized_shapes(name, device, len(impls), args.small)
            bar.set_postfix_str(name)
            rows += bench_set(name, shapes, impls, device, rounds, args.warmup, bw, lambda: bar.update(1),
                              fresh_grads=args.fresh_grads)
            paths = write_outputs(rows, meta, args.out)  # after every set: a run cut short keeps them
    print(format_table(rows))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

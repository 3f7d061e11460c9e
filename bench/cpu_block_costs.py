"""What the CPU step costs per element with compressed moments, part by part: ``python bench/cpu_block_costs.py``.

Compiles ``bench/cpu_block_costs.cpp`` against the kernel's own headers, ``csrc/cpu/`` (about 15
seconds), and times each part alone on one thread over 16384 elements (64 blocks, in L2), in ns per
element. The 8-bit format: dequantize, quantize (and the same without its table read: wrong codes, a
lower bound), the fp32 Adam update and the whole 8-bit block (whose update also reduces the blocks'
absmax). The fp8 codec: decode, and encode once the absmax is known; and the whole step with bf16 m
and v and with fp8 m + bf16 v; and the update's sqrt and divide alone, which run on the divider no
other instruction of the step uses (a floor under both steps). Compute costs only: the step's memory
traffic is not in them. Compare the whole steps with ``AdamW(fused=True)``'s time per param per core
in the bench report (vit_b: ms x threads / params). ``--against CHECKOUT`` times another checkout's
headers in the same rounds (an A/B of a kernel change), the parts both harnesses have. The tool
registers no ops: the headers hold the kernel's code, ``csrc/adam_spd_cpu.cpp`` its op
registrations.
"""
from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys

import torch
from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spd_kernels import quantization  # noqa: E402  (pure Python: does not load spd_kernels._C)

PARTS = ["dequantize m", "dequantize v", "quantize m", "quantize v", "quantize m, no table read",
         "quantize v, no table read", "fp32 Adam update", "whole 8-bit block",
         "fp8 decode m", "fp8 encode m", "whole step, bf16 m and v", "whole step, fp8 m + bf16 v",
         "sqrt and divide alone"]


# Registers the harness's ``block_cost`` as an op in library ``name``. The harness is built without
# torch/extension.h (pybind and the C++ API: 24 of a build's seconds here); an older checkout's
# harness defines the same function, so --against builds it the same way.
REGISTRATION = """
#include <torch/library.h>
TORCH_LIBRARY({name}, m) {{ m.def("block_cost", &block_cost); }}
"""


def build(root: str = ROOT, name: str = "spd_block_costs"):
    """The timing harness of checkout ``root`` (its bench/cpu_block_costs.cpp and csrc/ headers):
    ``block_cost(qmaps, m, v, part, reps)``, ns per element."""
    with open(os.path.join(root, "bench", "cpu_block_costs.cpp")) as f:
        source = f.read()
    load_inline(
        name, cpp_sources=[source, REGISTRATION.format(name=name)], is_python_module=False,
        no_implicit_headers=True, extra_include_paths=[os.path.join(root, "csrc")],
        extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", "-march=native"], extra_ldflags=["-fopenmp"])
    return getattr(torch.ops, name).block_cost


def parts_of(root: str):
    """The part names of checkout ``root``'s harness (its PARTS list): an older one may have fewer."""
    with open(os.path.join(root, "bench", "cpu_block_costs.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{root}: bench/cpu_block_costs.py has no PARTS list")


def moments(n: int, seed: int = 0):
    """Block-normalized moments like a step's: m ~ normal, v a mix of squared normals."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=gen).view(-1, quantization.BLOCK_SIZE)
    v = (0.3 * torch.randn(n, generator=gen) ** 2 + 0.7 * torch.randn(n, generator=gen) ** 2).view_as(m)
    return ((m / m.abs().amax(1, keepdim=True)).reshape(-1).contiguous(),
            (v / v.amax(1, keepdim=True)).reshape(-1).contiguous())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=16384, help="elements per part, a multiple of 256")
    parser.add_argument("--reps", type=int, default=2000, help="passes over them per timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is printed")
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="another checkout of this project (an older commit, say): its harness and headers "
                             "are timed too, part by part in the same rounds (the two in turn, the first of "
                             "the pair alternating), and each part's ratio printed. On a shared machine the "
                             "speed moves between runs by more than a change's effect; within one process "
                             "and one round the two see the same machine")
    args = parser.parse_args(argv)
    n, reps, rounds = args.elements, args.reps, args.rounds
    if n <= 0 or n % quantization.BLOCK_SIZE:
        parser.error(f"--elements must be a positive multiple of {quantization.BLOCK_SIZE}, got {n}")
    if args.against and not os.path.isfile(os.path.join(args.against, "bench", "cpu_block_costs.cpp")):
        parser.error(f"--against must be a checkout of this project (with bench/cpu_block_costs.cpp), got {args.against!r}")
    modules = {"this": build()}
    parts = {"this": range(len(PARTS))}
    if args.against:
        root = os.path.abspath(args.against)
        modules["against"] = build(root, "spd_block_costs_against")
        theirs = parts_of(root)  # the parts of that harness's numbering, by name
        parts["against"] = [k for k, name in enumerate(PARTS) if k < len(theirs) and theirs[k] == name]
    qmaps = torch.stack([quantization.dynamic_map(True), quantization.dynamic_map(False)]).contiguous()
    m, v = moments(n)
    times = {(side, part): [] for side in modules for part in parts[side]}
    for r in range(rounds):  # interleaved rounds, medians
        for part in range(len(PARTS)):
            for side in (list(modules) if r % 2 == 0 else list(modules)[::-1]):
                if part in parts[side]:
                    times[(side, part)].append(modules[side](qmaps, m, v, part, reps))
    for part, name in enumerate(PARTS):
        this = statistics.median(times[("this", part)])
        if not args.against or part not in parts["against"]:
            print(f"{name:28s} {this:6.3f} ns/element" + (", not in that checkout" if args.against else ""))
            continue
        that = statistics.median(times[("against", part)])
        print(f"{name:28s} {this:6.3f} ns/element, against {that:6.3f}: {this / that:5.3f}x")


if __name__ == "__main__":
    main()

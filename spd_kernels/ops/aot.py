"""Ahead-of-time compile of the fused kernels for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel to PTX and a cubin on a CPU-only machine;
the ptxas bundled in the triton wheel then reports registers and spills. This
is how CI knows that every kernel variant lowers for sm_80 and sm_90a, does not
spill, and keeps 128-bit global accesses.

The variants and their signatures are not typed here: ``variants()`` runs the
launcher on small CPU buckets with each kernel replaced by a recorder, so a
kernel argument added to the kernel and its launch is compiled here as it is.

    python -m spd_kernels.ops.aot      # prints one line per variant
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import formats
from ..bucket import Bucket
from .. import quantization
from ..hyperparameters import Hyperparameters
from . import adam_spd as k

#: (compute capability, ptxas arch) pairs CI compiles for
TARGETS: Tuple[Tuple[int, str], ...] = ((80, "sm_80"), (90, "sm_90a"))

_DTYPE_NAMES = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
#: how a launch argument's Python value maps to a kernel signature type
_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32",
                  torch.uint8: "*u8"}
#: the kernels the launcher may call (module globals it looks up at call time)
_KERNELS = ("_phase1_kernel", "_finalize_kernel", "_sum_partials_kernel", "_finalize_sums_kernel", "_phase2_kernel")


@dataclass
class Variant:
    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    #: whether full tiles must use 128-bit loads (fp32 storage everywhere)
    expect_v4: bool


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"a launch argument of type {type(value).__name__} has no signature type here")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call's
    signature and constexprs instead of launching."""

    def __init__(self, fn, seen: Dict[tuple, Variant]) -> None:
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, num_warps: int, **constexprs) -> None:
        names = self.fn.arg_names
        signature = {name: _arg_type(value) for name, value in zip(names, args)}
        missing = [n for n in names if n not in signature and n not in constexprs]
        if missing:
            raise TypeError(f"{self.fn.__name__}: the launcher passed no {missing}")
        key = (self.fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())), num_warps)
        if key in self.seen:
            return
        p, a = constexprs.get("P_DTYPE"), constexprs.get("A_DTYPE")
        switches = [f"{k.lower()}={int(constexprs[k])}" for k in ("HAS_ANCHOR", "AMSGRAD", "LR_IS_TENSOR")
                    if k in constexprs]
        m_fmt, v_fmt = constexprs.get("M_FMT", 0), constexprs.get("V_FMT", 0)
        if m_fmt or v_fmt:
            switches.append(f"m={_FORMAT_NAMES[int(m_fmt)]} v={_FORMAT_NAMES[int(v_fmt)]}")
        tag = " ".join(filter(None, [
            f"p={_DTYPE_NAMES[p]}" if p is not None else "",
            f"a={_DTYPE_NAMES[a] if constexprs.get('HAS_ANCHOR') else '-'}" if a is not None else "",
            *switches,
        ]))
        # 128-bit accesses are expected where every stream is fp32 (compressed codes are 1-2 bytes a lane)
        all_fp32 = (p == tl.float32 and (a == tl.float32 or not constexprs.get("HAS_ANCHOR"))
                    and not (m_fmt or v_fmt))
        self.seen[key] = Variant(
            f"{self.fn.__name__.strip('_').removesuffix('_kernel')} {tag}".strip(), self.fn, signature,
            constexprs, num_warps, all_fp32,
        )


_FORMAT_NAMES = {code: name for name, code in k.FORMAT_CODES.items()}
#: the compressed moment formats the launcher takes (fp32/fp32 is the plain variant)
CODED_PAIRS = (("bnb8", "bnb8"), ("bf16", "bf16"), ("fp8", "bf16"), ("fp32", "bf16"), ("bf16", "fp32"),
               ("fp8", "fp32"))


def _bucket(p_dtype, a_dtype, amsgrad: bool, lr_tensor: bool, pair=("fp32", "fp32")) -> Bucket:
    """A CPU bucket with a one-chunk and a multi-chunk tensor, so every kernel is called."""
    sizes = (7, k.BLOCK * k.TILES + 1)
    params = [torch.zeros(n, dtype=p_dtype) for n in sizes]
    moments = [formats.FORMATS[name] for name in pair]

    def scales(fmt):
        return [torch.zeros(quantization.num_blocks(n)) for n in sizes] if fmt.block else None

    return Bucket(
        params=params, grads=[torch.zeros_like(p) for p in params], formats=tuple(pair),
        exp_avgs=[moments[0].zeros(p, 0) for p in params], exp_avg_sqs=[moments[1].zeros(p, 1) for p in params],
        exp_avg_scales=scales(moments[0]), exp_avg_sq_scales=scales(moments[1]),
        max_exp_avg_sqs=[torch.zeros(n) for n in sizes] if amsgrad else None,
        anchors=[torch.zeros(n, dtype=a_dtype) for n in sizes] if a_dtype is not None else None,
        steps=[torch.zeros(()) for _ in sizes],
        hp=Hyperparameters(lr=torch.tensor(1e-3) if lr_tensor else 1e-3, amsgrad=amsgrad),
        sums=torch.zeros((len(sizes), 3), dtype=torch.float64),
    )


def variants() -> List[Variant]:
    """Every specialization the launcher produces, recorded from the launcher itself:
    whole and split steps over every storage dtype and switch it supports."""
    seen: Dict[tuple, Variant] = {}
    saved = {name: getattr(k, name) for name in _KERNELS}
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    try:
        for name, fn in saved.items():
            setattr(k, name, _Recorder(fn, seen))
        for p_dtype, a_dtype, amsgrad, lr_tensor in itertools.product(
            dtypes, (*dtypes, None), (False, True), (False, True)
        ):
            k.adam_spd_triton_step(_bucket(p_dtype, a_dtype, amsgrad, lr_tensor))
            k.adam_spd_triton_partials(_bucket(p_dtype, a_dtype, amsgrad, lr_tensor))()
        # compressed moments (no amsgrad): every param dtype, anchors of its dtype or none; a tensor lr
        # changes nothing in the coded paths, so one setting of it serves
        for p_dtype, pair in itertools.product(dtypes, CODED_PAIRS):
            for a_dtype in (p_dtype, torch.bfloat16, None):
                k.adam_spd_triton_step(_bucket(p_dtype, a_dtype, False, False, pair))
                k.adam_spd_triton_partials(_bucket(p_dtype, a_dtype, False, False, pair))()
    finally:
        for name, fn in saved.items():
            setattr(k, name, fn)
    return list(seen.values())


@dataclass
class CompileReport:
    variant: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    v4_loads: int
    v4_stores: int


def ptxas_path(capability: int) -> str:
    """The ptxas triton itself uses for this target (bundled in the wheel)."""
    from triton.backends.nvidia.compiler import get_ptxas  # picks a newer ptxas for sm_90+

    return get_ptxas(capability).path


def ptxas_usage(ptx: str, capability: int, arch: str) -> Tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas_path(capability), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr
    regs = sum(int(x) for x in re.findall(r"Used (\d+) registers", log))
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


def compile_variant(v: Variant, capability: int, arch: str) -> CompileReport:
    # Pointer arguments are 16-byte aligned at run time (torch allocations); say so, as the JIT would.
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(v.signature.values()) if t.startswith("*")}
    sig = dict(v.signature)
    for name in v.constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=v.fn, signature=sig, constexprs=v.constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": v.num_warps}
    )
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = ptxas_usage(ptx, capability, arch)
    return CompileReport(
        v.name, arch, regs, spill_st, spill_ld, ptx.count("ld.global.v4"), ptx.count("st.global.v4")
    )


def compile_all() -> List[CompileReport]:
    return [compile_variant(v, cap, arch) for cap, arch in TARGETS for v in variants()]


def main(argv=None) -> int:
    import argparse
    import dataclasses
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per variant and target")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    for r in compile_all():
        if args.json:
            print(json.dumps(dataclasses.asdict(r)), flush=True)
        else:
            print(
                f"{r.arch:7s} {r.variant:52s} regs={r.registers:3d} spills={r.spill_stores}/{r.spill_loads}"
                f" ld.v4={r.v4_loads} st.v4={r.v4_stores}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ahead-of-time compile of the fused kernels for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel to PTX and a cubin on a CPU-only machine;
the ptxas bundled in the triton wheel then reports registers and spills. This
is how CI knows that every kernel variant lowers for sm_80 and sm_90a, does not
spill, and keeps 128-bit global accesses.

    python -m spd_kernels.ops.aot      # prints one line per variant
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import adam_spd as k

#: (compute capability, ptxas arch) pairs CI compiles for
TARGETS: Tuple[Tuple[int, str], ...] = ((80, "sm_80"), (90, "sm_90a"))

_DTYPE_NAMES = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}

_PHASE1_SIG = {
    "ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunks_ptr": "*i64", "partials_ptr": "*fp32",
    "stats_ptr": "*fp32", "counts_ptr": "*fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32",
    "n_tensors": "i32", "n_chunks": "i32", "single_max": "i32", "lr": "fp32", "one_minus_beta1": "fp32",
    "beta2": "fp32",
    "one_minus_beta2": "fp32", "ln_beta1": "fp32", "ln_beta2": "fp32", "eps": "fp32",
    "weight_decay": "fp32", "max_scale": "fp32",
}
_FINALIZE_SIG = {
    "ptrs_ptr": "*i64", "multi_ptr": "*i64", "partials_ptr": "*fp32", "stats_ptr": "*fp32",
    "counts_ptr": "*fp32", "found_inf_ptr": "*fp32", "n_tensors": "i32", "n_multi": "i32", "weight_decay": "fp32",
    "max_scale": "fp32",
}
_SUM_PARTIALS_SIG = {"multi_ptr": "*i64", "partials_ptr": "*fp32", "sums_ptr": "*fp64", "n_tensors": "i32"}
_FINALIZE_SUMS_SIG = {
    "ptrs_ptr": "*i64", "sums_ptr": "*fp64", "stats_ptr": "*fp32", "counts_ptr": "*fp32", "found_inf_ptr": "*fp32",
    "n_tensors": "i32", "weight_decay": "fp32", "max_scale": "fp32",
}
_PHASE2_SIG = {
    "ptrs_ptr": "*i64", "numels_ptr": "*i64", "chunks_ptr": "*i64", "stats_ptr": "*fp32",
    "lr_ptr": "*fp32", "found_inf_ptr": "*fp32", "n_tensors": "i32", "n_chunks": "i32", "lr": "fp32",
    "ln_beta1": "fp32", "ln_beta2": "fp32", "eps": "fp32",
}


@dataclass
class Variant:
    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    #: whether full tiles must use 128-bit loads (fp32 storage everywhere)
    expect_v4: bool


def variants() -> Iterator[Variant]:
    """Every specialization the launcher can produce (dtypes x switches)."""
    dtypes = (tl.float32, tl.bfloat16, tl.float16)
    for p_dtype, a_dtype, anchored, amsgrad, lr_tensor in itertools.product(
        dtypes, dtypes, (True, False), (True, False), (True, False)
    ):
        if not anchored and a_dtype != tl.float32:
            continue  # the anchor dtype is unused without anchors
        tag = (
            f"p={_DTYPE_NAMES[p_dtype]} a={_DTYPE_NAMES[a_dtype] if anchored else '-'}"
            f" amsgrad={int(amsgrad)} lr_tensor={int(lr_tensor)}"
        )
        common = dict(
            P_DTYPE=p_dtype, A_DTYPE=a_dtype, HAS_ANCHOR=anchored, AMSGRAD=amsgrad,
            LR_IS_TENSOR=lr_tensor, ALIGNED=True, BLOCK=k.BLOCK, TILES=k.TILES,
        )
        all_fp32 = p_dtype == tl.float32 and (a_dtype == tl.float32 or not anchored)
        yield Variant(
            f"phase1 {tag}", k._phase1_kernel, _PHASE1_SIG,
            dict(common, G_DTYPE=p_dtype, STORE_Q=p_dtype == tl.float32), k.NUM_WARPS, all_fp32,
        )
        yield Variant(
            f"phase2 {tag}", k._phase2_kernel, _PHASE2_SIG,
            dict(common, RECOMPUTE_Q=p_dtype != tl.float32), k.NUM_WARPS, all_fp32,
        )
    yield Variant("finalize", k._finalize_kernel, _FINALIZE_SIG, dict(FINALIZE_BLOCK=k.FINALIZE_BLOCK), 4, False)
    # the split step (sharded params) adds these two around the caller's all-reduce
    yield Variant(
        "sum_partials", k._sum_partials_kernel, _SUM_PARTIALS_SIG, dict(FINALIZE_BLOCK=k.FINALIZE_BLOCK), 4, False
    )
    yield Variant("finalize_sums", k._finalize_sums_kernel, _FINALIZE_SUMS_SIG, {}, 1, False)


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
    try:  # triton >= 3.5 picks a newer ptxas for sm_90+
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except ImportError:
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


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

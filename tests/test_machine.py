"""The machine line every bench figure carries: the CPU named by family and model, not only by name."""
from __future__ import annotations

from spd_kernels.bench.machine import cpu_model

# The first lines of two processors' blocks, as a virtual machine shows them (one vendor name for
# several generations); the second block differs so that reading past the first would show.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512vl

processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9999
flags\t\t: fpu
"""

XEON = """processor\t: 0
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: avx2 avx512f avx512_fp16 avx512_bf16 amx_tile amx_bf16
"""


def test_a_bare_vendor_name_gets_family_model_and_extensions(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    assert cpu_model(str(path)) == "AMD EPYC (CPU family 25, model 17; AVX-512 BF16)"
    path.write_text(XEON)
    assert cpu_model(str(path)) == "Intel(R) Xeon(R) Processor (CPU family 6, model 167; AVX-512 BF16/FP16, AMX)"
    path.write_text(XEON.replace("avx512f avx512_fp16 avx512_bf16 amx_tile amx_bf16", "avx avx2"))
    assert cpu_model(str(path)) == "Intel(R) Xeon(R) Processor (CPU family 6, model 167; AVX2)"


def test_without_cpuinfo_the_name_still_comes_back(tmp_path):
    assert cpu_model(str(tmp_path / "missing"))  # platform's processor name, or "unknown CPU"

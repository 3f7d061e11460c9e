"""Every kernel variant lowers for sm_80 and sm_90a, without spills, with 128-bit
global accesses where the storage is fp32 (docs/design.md, "The GPU kernels").

The compile runs in a subprocess: this test session runs the kernels under the
interpreter, and interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from spd_kernels.ops import aot  # noqa: E402

VARIANTS = list(aot.variants())


@pytest.fixture(scope="module")
def reports():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "spd_kernels.ops.aot", "--json"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r["variant"], r["arch"]): r for r in rows}


@pytest.mark.parametrize("arch", [a for _, a in aot.TARGETS])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name.replace(" ", ",") for v in VARIANTS])
def test_variant_compiles_without_spills(reports, variant, arch):
    report = reports[(variant.name, arch)]
    assert report["registers"] > 0
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report
    if variant.expect_v4:
        assert report["v4_loads"] > 0 and report["v4_stores"] > 0, report

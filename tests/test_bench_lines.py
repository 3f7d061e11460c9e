"""The bench's line registry (spd_kernels.bench.lines): every line builds, steps and declares its bytes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spd_kernels.bench import lines, measure, report

CPU = torch.device("cpu")


def test_each_line_declares_its_bytes_per_param():
    # what a step must read and write per fp32 param: p, g, m, v (an anchor for SPD); p, m, v
    want = {"spd": (32, 28), "spd_reference": (32, 28), "spd_compiled": (32, 28), "spd_kernels": (32, 28),
            "spd_split": (32, 28), "spd_graph": (32, 28), "adamw_fused": (28, 28), "adamw_foreach": (28, 28),
            "spd_bf16a": (30, 28), "spd_8bit": (18, 16), "adamw_8bit_bnb": (16, 16),
            "spd_bf16": (22, 20), "spd_fp8": (20, 18), "adamw_fp8_torchao": (16, 16)}
    assert set(want) == set(lines.LINES)
    for name, (anchored, free) in want.items():
        assert (lines.LINES[name].step_bytes(True), lines.LINES[name].step_bytes(False)) == (anchored, free), name


# the two torch.compile lines take 10-35 s to compile their first step: the report runs them
@pytest.mark.parametrize("name", [n for n in lines.LINES if lines.can_run(n, CPU)
                                  and n not in ("spd_compiled", "adamw_fp8_torchao")])
def test_each_line_that_runs_here_builds_and_steps(name):
    shapes = [(64, 32), (32,), (5000,)]
    line = lines.build(name, shapes, CPU, anchored=True)
    params = measure.params_of(line)
    before = [p.detach().clone() for p in params]
    line.step()
    line.step()
    assert [tuple(p.shape) for p in params] == shapes
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # it stepped every tensor
    share = measure.projected_share(line, sum(p.numel() for p in params))
    assert (share is not None) == (lines.LINES[name].counts_projections and name != "spd_graph")


def test_the_report_times_fresh_grads_by_default():
    parser = report.build_parser()
    assert not parser.parse_args([]).same_grads
    assert parser.parse_args(["--same-grads"]).same_grads
    with pytest.raises(SystemExit):
        parser.parse_args(["--same-grads", "--fresh-grads"])


def test_the_report_does_not_import_the_sweep():
    code = ("import sys, spd_kernels.bench.report, spd_kernels.bench.lines, spd_kernels.bench.measure; "
            "assert 'spd_kernels.bench.sweep' not in sys.modules and 'spd_kernels.bench.loaded' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

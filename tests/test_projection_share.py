"""bench/projection_share.py splits a set's SPD step into its first pass and its projection by
stepping each line again at lambda = 0: that copy must never project (the tool stops if it does),
the other must, and a line that is not an SPD line is refused by name."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import projection_share  # noqa: E402
from spd_kernels.bench import lines  # noqa: E402
from spd_kernels.bench.measure import projected_share  # noqa: E402


def test_lambda_zero_never_projects_and_the_line_itself_does():
    shapes = [(96, 128), (64, 256), (128, 64), (32, 512)]  # each fires about half the steps
    n = sum(a * b for a, b in shapes)
    on = lines.build("spd_fp8", shapes, torch.device("cpu"), True, seed=int(torch.randint(0, 2**31 - 1, ())))
    off = projection_share.without_projection(
        lines.build("spd_fp8", shapes, torch.device("cpu"), True, seed=int(torch.randint(0, 2**31 - 1, ()))))
    fired = []
    for _ in range(6):
        for opt in (on, off):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad.normal_(0.0, 1e-2)
            opt.step()
        assert projected_share(off, n) == 0.0
        fired.append(projected_share(on, n))
    assert max(fired) > 0.0, fired  # fresh grads at the bench's scale fire some tensors


def test_the_tool_prints_both_parts_of_each_line(capsys):
    projection_share.main(["--set", "lora", "--rounds", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    for name in projection_share.DEFAULT_LINES:
        row = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert len(row) == 1, out
        ms, ratio, share, first, first_ratio, projection, projection_ratio = map(float, row[0].split()[1:])
        assert ms > 0 and first > 0 and 0 < share <= 100
        assert projection == pytest.approx(ms - first, abs=0.011)


def test_a_line_that_is_not_spd_is_refused():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "projection_share.py"), "--lines",
                          "adamw_fused"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--lines: 'adamw_fused' is not an SPD line" in out.stderr, out.stderr

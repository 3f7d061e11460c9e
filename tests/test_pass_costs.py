"""bench/cpu_pass_costs.py times SPD's two passes apart by its grads alone: the grads of a 'fired'
case must make every step project, the others' none, on every line it times, or its figures are
not what they say. The tool checks that itself and stops; these tests hold the grads to it and the
check to failing."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cpu_pass_costs  # noqa: E402
from spd_kernels.stats import STAT_SCALE  # noqa: E402


@pytest.mark.parametrize("name", cpu_pass_costs.SPD_LINES)
@pytest.mark.parametrize("fire", [False, True])
def test_grads_fire_the_projection_at_every_step_or_never(name, fire):
    case = cpu_pass_costs.Tensor1(name, 96, 128, fire, seed=int(torch.randint(0, 2**31 - 1, ())))
    scales = []
    for _ in range(12):
        case.set_grad()
        case.step()  # checks every step
        scales.append(float(case.opt.last_step_stats()[case.p][STAT_SCALE]))
    assert all((s > 0) == fire for s in scales), scales


def test_a_step_against_the_premise_stops_the_run():
    case = cpu_pass_costs.Tensor1("spd_fp8", 96, 128, True, seed=1)
    case.set_grad()
    case.fire = False  # these grads fire the projection: the check must say that it fired
    with pytest.raises(RuntimeError, match="projection fired"):
        case.step()
    case = cpu_pass_costs.Tensor1("spd_fp8", 96, 128, False, seed=1)
    case.set_grad()
    case.fire = True
    with pytest.raises(RuntimeError, match="did not fire"):
        case.step()


def test_too_small_a_tensor_is_refused():
    with pytest.raises(ValueError, match="rows \\* cols"):
        cpu_pass_costs.Tensor1("spd_fp8", 16, 16, True, seed=1)


def test_the_tool_prints_every_line(capsys):
    cpu_pass_costs.main(["--rows", "64", "--cols", "256", "--rounds", "1", "--steps", "1", "--warmup", "2"])
    out = capsys.readouterr().out
    for name in ["adamw_fused", *cpu_pass_costs.SPD_LINES]:
        assert any(line.startswith(name + " ") for line in out.splitlines()), out

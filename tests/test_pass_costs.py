"""bench/cpu_pass_costs.py times SPD's two passes apart by its grads alone: the grads of a 'fired'
case must make every step project, the others' none, on every line it times, or its figures are
not what they say. The tool checks that itself and stops; these tests hold the grads to it and the
check to failing. Its floor pass (bench/cpu_stream_floor.cpp) must move the bytes of each line's
layout, every array read and p, m and v written, or it is no floor: it is checked against the same
arithmetic in torch. So is the projection's floor (p and the anchor read, p written)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cpu_pass_costs  # noqa: E402
from spd_kernels.bench.lines import LINES  # noqa: E402
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


@pytest.fixture(scope="module")
def stream_pass(tmp_path_factory):  # a fresh build, not a cached one
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
        yield cpu_pass_costs.build_floor()


def test_each_floor_layout_moves_its_lines_bytes():
    for name in cpu_pass_costs.LAYOUTS:
        assert cpu_pass_costs.layout_bytes(name) == LINES[name].step_bytes(True), name


def _value(x: torch.Tensor, kind: str) -> torch.Tensor:
    """An array of the floor's layout as fp32 values (bf16 patterns are int16)."""
    return x.view(torch.bfloat16).float() if kind == "bf16" else x.float()


@pytest.mark.parametrize("name", list(cpu_pass_costs.LAYOUTS))
def test_the_floor_pass_reads_every_array_and_writes_p_m_and_v(stream_pass, name):
    floor = cpu_pass_costs.Floor(stream_pass, name, 37, 256)  # 9472 elements: not a whole chunk
    # grads in [1, 2), not the tool's 1e-3: every m and v then moves by more than a bf16 step, and
    # every code by 1 or 2, so an array left unwritten fails the checks below
    floor.arrays = (floor.arrays[0], 1.0 + torch.rand(floor.arrays[0].shape), *floor.arrays[2:])
    p, g, m, v, a = (x.clone() if x is not None else None for x in floor.arrays)
    m_kind, v_kind, a_kind = cpu_pass_costs.LAYOUTS[name]
    floor.step()
    m_new = _value(m, m_kind) + g
    v_new = _value(v, v_kind) + g * g
    target = _value(a, a_kind) if a is not None else 0.0
    torch.testing.assert_close(floor.arrays[0], p - 1e-6 * m_new * (v_new + target), rtol=1e-6, atol=1e-7)
    if m_kind == "u8":  # the code: the new value truncated to an integer
        assert torch.equal(floor.arrays[2], m_new.to(torch.int32).to(torch.uint8))
    else:  # fp32, or bf16 truncated: within one bf16 step of the new value (2^-7 relative)
        torch.testing.assert_close(_value(floor.arrays[2], m_kind), m_new, rtol=2**-7, atol=0)
    torch.testing.assert_close(_value(floor.arrays[3], v_kind), v_new, rtol=2**-7, atol=0)
    assert not torch.equal(floor.arrays[0], p)


def test_the_floor_pass_refuses_arrays_of_other_sizes(stream_pass):
    p, g, m, v = torch.rand(512), torch.rand(512), torch.rand(512), torch.rand(256)
    with pytest.raises(RuntimeError, match="p's numel"):
        stream_pass(p, g, m, v, None)
    with pytest.raises(RuntimeError, match="m: float32"):
        stream_pass(p, g, torch.zeros(512, dtype=torch.float64), torch.rand(512), None)


@pytest.mark.parametrize("name", cpu_pass_costs.SPD_LINES)
def test_the_projection_floor_reads_p_and_the_anchor_and_writes_p(stream_pass, name):
    floor = cpu_pass_costs.ProjectionFloor(stream_pass, name, 37, 256)
    # an anchor far from p: p's change is then 0.001 (a - p), over 1e-4 of p, where the first
    # pass's (1e-6 m (v + a) with the tool's 1e-3 grads) is under 1e-8
    a_kind = cpu_pass_costs.LAYOUTS[name][2]
    far = 10.0 + torch.rand(floor.arrays[0].shape)
    anchor = far if a_kind == "f32" else far.to(torch.bfloat16).view(torch.int16)
    floor.arrays = (*floor.arrays[:4], anchor)
    p, g, m, v, a = (x.clone() for x in floor.arrays)
    floor.step()  # the first pass's floor, then the projection's
    m_new, v_new = _value(m, cpu_pass_costs.LAYOUTS[name][0]) + g, _value(v, cpu_pass_costs.LAYOUTS[name][1]) + g * g
    target = _value(a, a_kind)
    q = p - 1e-6 * m_new * (v_new + target)
    torch.testing.assert_close(floor.arrays[0], 0.999 * q + 0.001 * target, rtol=1e-6, atol=1e-7)


def test_the_projection_floor_refuses_arrays_of_other_sizes(stream_pass):
    with pytest.raises(RuntimeError, match="p's numel"):
        torch.ops.spd_stream_floor.projection_pass(torch.rand(512), torch.rand(256))
    with pytest.raises(RuntimeError, match="p: contiguous float32"):
        torch.ops.spd_stream_floor.projection_pass(torch.rand(512, dtype=torch.float64), None)


def test_the_tool_prints_every_line(stream_pass, capsys):
    cpu_pass_costs.main(["--rows", "64", "--cols", "256", "--rounds", "1", "--steps", "1", "--warmup", "2"])
    out = capsys.readouterr().out
    names = ["adamw_fused", *cpu_pass_costs.SPD_LINES]
    first, second = out.split("with the projection at every step:")
    for name in names:  # every line in the first pass's table, the SPD lines in the second's
        assert any(line.startswith(name + " ") for line in first.splitlines()), out
    for name in cpu_pass_costs.SPD_LINES:
        assert any(line.startswith(name + " ") for line in second.splitlines()), out

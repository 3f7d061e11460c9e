"""Which cache the CPU kernel's AVX-512 steps prefetch into (``spd_kernels.cpu_prefetch``): the
default by CPU, the environment override, the setter's checks, and that the level changes no bit
of a step."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from spd_kernels import _cpu, cpu_prefetch
from spd_kernels.testing import bucket_of, clone_state, new_state

from .test_machine import XEON, ZEN4

needs_cpu_kernel = pytest.mark.skipif(bool(_cpu.load_error()), reason="the compiled CPU kernel is not built")
ZEN4_FIRST = ZEN4.split("\n\n")[0].replace("processor\t: 0\n", "processor\t: 0\nvendor_id\t: AuthenticAMD\n", 1)


@pytest.mark.parametrize("cpuinfo, level", [
    (ZEN4_FIRST, "l2"),
    (ZEN4_FIRST.replace("cpu family\t: 25", "cpu family\t: 26"), "l1"),  # a Zen 5: measured into L1
    (ZEN4_FIRST.replace(" avx512f avx512bw avx512_bf16 avx512vl", ""), "l1"),  # a Zen 3: no AVX-512 steps
    (XEON.replace("processor\t: 0\n", "processor\t: 0\nvendor_id\t: GenuineIntel\n"), "l1"),
    (None, "l1"),  # no cpuinfo
], ids=["zen4", "zen5", "zen3", "xeon", "no_cpuinfo"])
def test_the_default_is_into_l2_on_a_zen4_only(tmp_path, cpuinfo, level):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert cpu_prefetch.default_level(str(path)) == level


def test_the_environment_overrides_the_default_and_a_bad_value_is_named(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4_FIRST)
    monkeypatch.setenv(cpu_prefetch.ENV, "L1")
    assert cpu_prefetch.configured_level(str(path)) == "l1"
    monkeypatch.setenv(cpu_prefetch.ENV, "")
    assert cpu_prefetch.configured_level(str(path)) == "l2"
    monkeypatch.setenv(cpu_prefetch.ENV, "l3")
    with pytest.raises(ValueError, match=r"SPD_KERNELS_CPU_PREFETCH='l3'.*'l1'.*'l2'.*default \('l2'\)"):
        cpu_prefetch.configured_level(str(path))


@pytest.fixture
def restore_level():
    before = cpu_prefetch.prefetch()
    yield
    cpu_prefetch.set_prefetch(before)


@needs_cpu_kernel
def test_set_prefetch_returns_the_level_it_replaced_and_refuses_others(restore_level):
    assert cpu_prefetch.set_prefetch("l2") in ("l1", "l2")
    assert cpu_prefetch.set_prefetch("L1") == "l2"
    assert cpu_prefetch.prefetch() == "l1"
    for bad in ("l3", "", 2, None):
        with pytest.raises(ValueError, match="set_prefetch: level must be 'l1'.*or 'l2'"):
            cpu_prefetch.set_prefetch(bad)
    with pytest.raises(RuntimeError, match="set_prefetch_level: level must be 1 .* or 2 .*, got 3"):
        torch.ops.spd_kernels.set_prefetch_level(3)
    assert cpu_prefetch.prefetch() == "l1"  # the refused calls changed nothing


@needs_cpu_kernel
@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
@pytest.mark.parametrize("anchor", [None, torch.bfloat16, torch.float32],
                         ids=["no_anchor", "bf16_anchor", "fp32_anchor"])
def test_both_levels_step_to_the_same_bits(restore_level, pair, anchor):
    # The level picks another instantiation of the AVX-512 steps (with and without a grad scale):
    # it must change no bit of params, moments, scales or stats.
    gen = torch.Generator().manual_seed(11)
    states = {"l1": new_state([300, 4096, 20_001], torch.float32, anchor, False, gen, torch.device("cpu"),
                              formats=pair)}
    states["l2"] = clone_state(states["l1"])
    start = [p.clone() for p in states["l1"]["params"]]
    hp = dict(lr=0.02, weight_decay=1.5)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in states["l1"]["params"]]
        stats = {}
        for level, state in states.items():
            cpu_prefetch.set_prefetch(level)
            bucket = bucket_of(state, [g * 512.0 for g in grads] if step % 2 else grads, **hp)
            if step % 2:
                bucket.grad_scale = torch.tensor(512.0)
            stats[level] = _cpu.adam_spd_cpu_step(bucket)
        assert torch.equal(stats["l1"], stats["l2"]), step
        for key, value in states["l1"].items():
            if value is not None and key != "formats":
                assert all(torch.equal(x, y) for x, y in zip(value, states["l2"][key])), (step, key)
    assert not any(torch.equal(p, q) for p, q in zip(start, states["l1"]["params"]))  # the steps moved them


def _load_in_a_fresh_process(value: str) -> subprocess.CompletedProcess:
    code = ("import torch\nfrom spd_kernels import AdamSPD, cpu_prefetch\n"
            "p = torch.nn.Parameter(torch.randn(64))\n"
            "AdamSPD([p], lr=0.1, impl='cpu')\nprint(cpu_prefetch.prefetch())\n")
    env = dict(os.environ, **{cpu_prefetch.ENV: value})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@needs_cpu_kernel
def test_loading_applies_the_environment_and_refuses_a_bad_value_loudly():
    done = _load_in_a_fresh_process("l2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "l2"
    done = _load_in_a_fresh_process("fast")
    assert done.returncode != 0
    assert "ValueError: SPD_KERNELS_CPU_PREFETCH='fast'" in done.stderr


@needs_cpu_kernel
def test_the_bench_machine_line_names_the_level(restore_level):
    from spd_kernels.bench.measure import device_name

    for level in ("l1", "l2"):
        cpu_prefetch.set_prefetch(level)
        assert device_name(torch.device("cpu")).endswith(f" threads; kernel prefetch into {level.upper()})")

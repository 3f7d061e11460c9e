"""The compiled CPU kernel (csrc/) against the reference; determinism; the fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from spd_kernels import AdamSPD, _cpu, backends
from spd_kernels import quantization
from spd_kernels.hyperparameters import PACKED, Hyperparameters
from spd_kernels.reference import reference_step
from spd_kernels.testing import CASES, bucket_of, case_id, clone_state, new_state, run_step_parity, two_shard_step

from .helpers import clone_params, make_anchors, make_params, set_grads

needs_kernel = pytest.mark.skipif(bool(_cpu.load_error()), reason=f"CPU kernel not built: {_cpu.load_error()}")

CHUNK, TASK_MAX = 16384, 8 * 16384  # csrc/adam_spd_cpu.cpp
#: single element, odd, empty, several chunks with a tail (one task), exactly one chunk, one more
#: than a chunk, one more than a task takes (chunk-parallel)
SIZES = [1, 7, 0, 3 * CHUNK + 5, CHUNK, CHUNK + 1, 1000, TASK_MAX + 1]
CPU = torch.device("cpu")


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=[f"p={c[0]}-a={c[1]}-amsgrad={c[2]}-lr_tensor={c[3]}" for c in CASES])
def test_kernel_step_matches_reference(case):
    run_step_parity(_cpu.adam_spd_cpu_step, SIZES, case, CPU, steps=20)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_trajectory_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    ours = make_params([(40, 700), (5,), (0,), (64, 64), (3 * CHUNK + 1,)], dtype, gen)
    theirs = clone_params(ours)
    pre = make_anchors(ours, generator=gen)
    kw = dict(lr=2e-2, weight_decay=1.0, amsgrad=True)
    opt = AdamSPD([{"params": ours, "pre": pre}], impl="cpu", **kw)
    ref = AdamSPD([{"params": theirs, "pre": pre}], impl="reference", **kw)
    for t in range(20):
        set_grads(ours, pre, [(-1.0) ** (i + t // 3) for i in range(len(ours))], gen)
        for p, q in zip(ours, theirs):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        if dtype == torch.bfloat16:  # one rounding may differ per step: compare steps, not drift
            for p, q in zip(ours, theirs):
                torch.testing.assert_close(p, q, rtol=2.0**-7, atol=1e-6)
                with torch.no_grad():
                    q.copy_(p)
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    ref.state[q][key].copy_(opt.state[p][key])
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_bitwise_equal_for_one_and_two_threads():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(4)
            state = new_state([5 * CHUNK + 3, 100, CHUNK, TASK_MAX + 3], torch.float32, torch.float32, False, gen,
                              CPU)
            for _ in range(3):
                grads = [torch.randn(p.shape, generator=gen) for p in state["params"]]
                stats = _cpu.adam_spd_cpu_step(bucket_of(state, grads, lr=0.05, beta1=0.9, beta2=0.99,
                                                         eps=1e-8, weight_decay=2.0, amsgrad=False))
            results.append((state, stats))
    finally:
        torch.set_num_threads(threads)
    (a, sa), (b, sb) = results
    assert torch.equal(sa, sb)
    for x, y in zip(a["params"] + a["exp_avgs"], b["params"] + b["exp_avgs"]):
        assert torch.equal(x, y)


def test_fallback_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setattr(_cpu, "load_error", lambda: "ImportError: pretend the build is missing")
    backends._warn_fallback.cache_clear()
    try:
        params = make_params([(6,), (2, 3)])
        twin = clone_params(params)
        with pytest.warns(RuntimeWarning, match="CPU kernel is not available"):
            opt = AdamSPD(params, lr=0.1, weight_decay=1.0)
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
        assert [backend.name for backend, _ in opt.buckets()] == ["reference"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second step must not warn again
            opt._plans.retire()
            opt.step()
        with pytest.raises(RuntimeError, match="impl='cpu' but the compiled CPU kernel is not available"):
            AdamSPD(twin, impl="cpu")
    finally:
        backends._warn_fallback.cache_clear()


def test_import_works_without_the_extension():
    # a fresh interpreter where spd_kernels._C cannot be imported at all
    code = (
        "import sys, warnings; sys.modules['spd_kernels._C'] = None\n"
        "import torch, spd_kernels\n"
        "p = torch.nn.Parameter(torch.randn(4)); p.grad = torch.randn(4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    opt = spd_kernels.AdamSPD([p], weight_decay=1.0); opt.step()\n"
        "assert any('CPU kernel is not available' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert opt.buckets()[0][0].name == 'reference'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@needs_kernel
def test_op_schema_and_fake_impl():
    gen = torch.Generator().manual_seed(5)
    state = new_state([5, 20000], torch.float32, torch.float32, True, gen, CPU)
    grads = [torch.randn(p.shape, generator=gen) for p in state["params"]]
    args = (state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
            state["anchors"], state["steps"], [], [], None, [], Hyperparameters(lr=0.01, weight_decay=1.0).packed(), 1.0)
    torch.library.opcheck(
        torch.ops.spd_kernels.adam_spd_step.default, args,
        test_utils=("test_schema", "test_faketensor"),
    )
    # and with 8-bit moments
    state = new_state([5, 20000], torch.float32, torch.float32, False, gen, CPU, eight_bit=True)
    args = (state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], [], state["anchors"], state["steps"],
            state["exp_avg_scales"], state["exp_avg_sq_scales"], _cpu.qmaps(), [],
            Hyperparameters(lr=0.01, weight_decay=1.0).packed(), 1.0)
    torch.library.opcheck(
        torch.ops.spd_kernels.adam_spd_step.default, args,
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_kernel
def test_the_op_reads_hyper_in_the_order_python_packs_it():
    # the C++ slots are named once (HP_*); a build that disagrees is not loaded
    assert tuple(torch.ops.spd_kernels.hyperparameter_names()) == PACKED
    gen = torch.Generator().manual_seed(6)
    state = new_state([5], torch.float32, torch.float32, False, gen, CPU)
    before = clone_state(state)
    with pytest.raises(RuntimeError, match=r"hyper must hold 6 values \(lr, beta1, beta2, eps, weight_decay"):
        torch.ops.spd_kernels.adam_spd_step(
            state["params"], [torch.ones(5)], state["exp_avgs"], state["exp_avg_sqs"], [], state["anchors"],
            state["steps"], [], [], None, [], [0.1, 0.9, 0.999], 1.0)
    for key in ("params", "exp_avgs", "steps"):
        assert all(torch.equal(x, y) for x, y in zip(state[key], before[key]))


@needs_kernel
def test_auto_picks_the_cpu_kernel():
    params = make_params([(3,)])
    assert backends.choose("auto", params[0], None).name == "cpu"
    assert backends.choose("auto", params[0].double(), None).name == "reference"


@needs_kernel
def test_inner_loops_were_vectorized():
    # packed square roots and divisions (SSE "sqrtps"/"divps", AVX "vsqrtps"/"vdivps")
    # only appear if the compiler turned the per-element loops into SIMD code
    import shutil

    from spd_kernels import _C

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert "sqrtps" in asm and "divps" in asm


@needs_kernel
def test_capped_projection_matches_reference():
    # lam = 40 makes lam * r exceed 1 often: the cap must bind, in the kernel as in the reference
    run_step_parity(_cpu.adam_spd_cpu_step, SIZES, (torch.float32, torch.float32, False, False), CPU, steps=10, lam=40.0,
                    max_scale=1.0)


@needs_kernel
@pytest.mark.parametrize("case", CASES[:6], ids=[f"p={c[0]}-a={c[1]}-amsgrad={c[2]}-lr_tensor={c[3]}" for c in CASES[:6]])
def test_split_step_on_two_shards_matches_reference(case):
    # the partials/project ops with the shards' sums added in between, as FSDP2 runs them
    run_step_parity(two_shard_step(_cpu.adam_spd_cpu_partials), SIZES, case, CPU, steps=10)


@needs_kernel
def test_split_ops_schema_and_fake_impl():
    gen = torch.Generator().manual_seed(6)
    state = new_state([5, 20000], torch.float32, torch.float32, True, gen, CPU)
    grads = [torch.randn(p.shape, generator=gen) for p in state["params"]]
    sums = torch.zeros((2, 3), dtype=torch.float64)
    lr = torch.tensor(0.01)
    hyper = Hyperparameters(lr=lr, weight_decay=1.0).packed()
    torch.library.opcheck(
        torch.ops.spd_kernels.adam_spd_partials.default,
        (state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
         state["anchors"], state["steps"], [], [], None, [], hyper, 1.0, sums, lr),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.spd_kernels.adam_spd_project.default,
        (state["params"], state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"], state["anchors"],
         state["steps"], [], [], None, sums, hyper, lr),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_kernel
def test_ops_name_bad_sums_and_lr_tensor():
    state = new_state([5], torch.float32, None, False, torch.Generator().manual_seed(1), CPU)
    grads = [torch.randn(5)]
    args = (state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], [], [], state["steps"], [], [], None, [],
            Hyperparameters(lr=0.01, weight_decay=1.0).packed(), 1.0)
    with pytest.raises(RuntimeError, match=r"adam_spd_partials: sums must be a contiguous fp64 CPU tensor of shape \[1, 3\]"):
        torch.ops.spd_kernels.adam_spd_partials(*args, torch.zeros((1, 3)))
    with pytest.raises(RuntimeError, match="adam_spd_step: lr_tensor must be a one-element CPU tensor"):
        torch.ops.spd_kernels.adam_spd_step(*args, torch.ones(2))


_THREAD_PROBE = """
import os, sys, torch
from spd_kernels import AdamSPD
torch.set_num_threads(1)  # build everything without waking a thread
shapes = {shapes}
params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
for p in params:
    p.grad = torch.randn(p.shape)
opt = AdamSPD(params, lr=1e-3, weight_decay=1.0, impl="cpu")
torch.set_num_threads(2)
before = len(os.listdir("/proc/self/task"))
for _ in range(3):
    opt.step()
print(before, len(os.listdir("/proc/self/task")))
"""


@needs_kernel
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to count threads")
@pytest.mark.parametrize("shapes, fans_out", [
    ([(64, 32), (64,), (64, 64), (64,)] * 4, False),  # a 16-tensor MLP: stays on the calling thread
    ([(512, 512)], True),  # 262144 elements: worth a second thread (shows the probe sees one)
])
def test_small_buckets_do_not_wake_threads(shapes, fans_out):
    # On a loaded machine waking the OpenMP team costs a scheduler slice (ms) per step:
    # a small bucket must not do it. Thread creation is the observable, not time.
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE.format(shapes=shapes)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert (after > before) == fans_out, (before, after)


EIGHT_BIT_CASES = [c for c in CASES if not c[2]]  # 8-bit moments: no amsgrad


@needs_kernel
@pytest.mark.parametrize("case", EIGHT_BIT_CASES, ids=[case_id(c) for c in EIGHT_BIT_CASES])
def test_8bit_kernel_step_matches_reference(case):
    # 8-bit moments in every tensor of the bucket (the optimizer keeps the small ones fp32,
    # the kernel takes any size): codes equal but for ties, params within the fp32 tolerance
    run_step_parity(_cpu.adam_spd_cpu_step, SIZES + [300], case, CPU, steps=12, eight_bit=True)


@needs_kernel
@pytest.mark.parametrize("case", EIGHT_BIT_CASES[:4], ids=[case_id(c) for c in EIGHT_BIT_CASES[:4]])
def test_8bit_split_step_on_one_shard_equals_the_whole_step(case):
    # the split ops (partials, then project from the sums) on the whole tensors: bitwise the fused step
    gen = torch.Generator().manual_seed(21)
    p_dtype, a_dtype, _, _ = case
    state = new_state(SIZES, p_dtype, a_dtype, False, gen, CPU, eight_bit=True)
    twin = clone_state(state)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen).to(p_dtype) for p in state["params"]]
        whole = _cpu.adam_spd_cpu_step(bucket_of(state, grads, lr=0.02, weight_decay=1.5))
        split = bucket_of(twin, grads, lr=0.02, weight_decay=1.5)
        split.sums = torch.zeros((len(SIZES), 3), dtype=torch.float64)
        stats = _cpu.adam_spd_cpu_partials(split)()
        assert torch.equal(whole, stats), step
        for key, value in state.items():
            if value is not None and key != "formats":
                assert all(torch.equal(x, y) for x, y in zip(value, twin[key])), (step, key)


@needs_kernel
def test_8bit_ops_name_bad_inputs():
    state = new_state([300], torch.float32, torch.float32, False, torch.Generator().manual_seed(2), CPU,
                      eight_bit=True)
    hyper = Hyperparameters(lr=0.01).packed()
    base = (state["params"], [torch.randn(300)], state["exp_avgs"], state["exp_avg_sqs"], [], state["anchors"],
            state["steps"])
    with pytest.raises(RuntimeError, match="8-bit moments need qmaps"):
        torch.ops.spd_kernels.adam_spd_step(*base, state["exp_avg_scales"], state["exp_avg_sq_scales"], None, [],
                                            hyper, 1.0)
    with pytest.raises(RuntimeError, match="scales of tensor 0 must be contiguous fp32, one per 256 elements"):
        torch.ops.spd_kernels.adam_spd_step(*base, [torch.zeros(1)], [torch.zeros(1)], _cpu.qmaps(), [], hyper, 1.0)
    with pytest.raises(RuntimeError, match="one per tensor for a block-scaled moment"):
        torch.ops.spd_kernels.adam_spd_step(*base, [], [], None, [], hyper, 1.0)


@needs_kernel
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_8bit_kernel_codes_every_midpoint_like_the_reference(p_dtype):
    # beta1 = 0 on a fresh state makes m the grad itself: the kernel then quantizes values we
    # choose. Every midpoint of the signed map (times the block's absmax, a power of two, so
    # the scaling is exact) and its two float neighbours: the codes must be the reference's,
    # bit for bit, ties (a value on a midpoint) to the lower code included.
    # Then values of both signs at every scale (log-uniform over 1e-9 .. 8): beta2 = 0 makes v
    # the grad squared, so the second moment's codes (the unsigned map) are checked too.
    mids = quantization.midpoints(quantization.dynamic_map(True)) * 8.0
    gen = torch.Generator().manual_seed(5)
    spread = torch.exp(torch.empty(4000).uniform_(-20.7, 2.07, generator=gen))
    spread = torch.where(torch.rand(4000, generator=gen) < 0.5, -spread, spread)
    values = torch.cat([torch.stack([torch.nextafter(mids, torch.full_like(mids, -9.0)), mids,
                                     torch.nextafter(mids, torch.full_like(mids, 9.0))], dim=1).reshape(-1),
                        spread.clamp(-8.0, 8.0), torch.zeros(3)])
    per_block = quantization.BLOCK_SIZE - 1  # each block also holds an 8.0: its absmax
    blocks = [torch.cat([torch.tensor([8.0]), values[i:i + per_block]]) for i in range(0, values.numel(), per_block)]
    grad = torch.cat(blocks).to(p_dtype)
    assert torch.equal(grad.float(), torch.cat(blocks)) or p_dtype != torch.float32
    state = new_state([grad.numel()], p_dtype, torch.float32, False, torch.Generator().manual_seed(4), CPU,
                      eight_bit=True)
    want = clone_state(state)
    _cpu.adam_spd_cpu_step(bucket_of(state, [grad], lr=0.01, beta1=0.0, beta2=0.0, weight_decay=1.0))
    reference_step(**want, grads=[grad], hp=Hyperparameters(lr=0.01, beta1=0.0, beta2=0.0, weight_decay=1.0))
    assert torch.equal(state["exp_avg_scales"][0], want["exp_avg_scales"][0])
    assert torch.equal(state["exp_avgs"][0], want["exp_avgs"][0])
    assert torch.equal(state["exp_avg_sq_scales"][0], want["exp_avg_sq_scales"][0])
    assert torch.equal(state["exp_avg_sqs"][0], want["exp_avg_sqs"][0])

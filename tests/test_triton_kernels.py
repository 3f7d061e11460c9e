"""The fused Triton kernels against the reference.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (conftest.py).
Each step starts both implementations from the same state (the kernel's), so
the comparison checks one step's function at every step count without drift;
a separate test follows a whole optimizer trajectory.
"""
from __future__ import annotations

import pytest
import torch

from spd_kernels import AdamSPD
from spd_kernels.backends import triton_runs_on
from spd_kernels.bucket import Bucket
from spd_kernels.ops import adam_spd as k
from spd_kernels.reference import reference_step
from spd_kernels.stats import STAT_C, STAT_NORM_P_A, STAT_NORM_Q_A, STAT_R, STAT_SCALE

from .helpers import clone_params, make_params, signed_grad

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")

CHUNK = k.BLOCK * k.TILES
#: single element, odd, just over a tile, empty, several chunks with a tail, exactly one chunk
SIZES = [1, 7, 4097, 0, 3 * CHUNK + 5, CHUNK, 1025]

#: per storage dtype: params may differ by one rounding (the interpreter truncates
#: where the GPU rounds to nearest), moments are fp32 everywhere
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}
MOMENT_TOL = dict(rtol=1e-5, atol=1e-7)


def new_state(sizes, p_dtype, a_dtype, amsgrad, gen):
    params = [torch.randn(n, generator=gen).to(p_dtype).to(DEVICE) for n in sizes]
    return dict(
        params=params,
        exp_avgs=[torch.zeros(n, device=DEVICE) for n in sizes],
        exp_avg_sqs=[torch.zeros(n, device=DEVICE) for n in sizes],
        max_exp_avg_sqs=[torch.zeros(n, device=DEVICE) for n in sizes] if amsgrad else None,
        anchors=None if a_dtype is None else [
            (p.float() + 0.5 * torch.randn(p.shape, generator=gen).to(DEVICE)).to(a_dtype) for p in params
        ],
        steps=[torch.zeros((), device=DEVICE) for _ in sizes],
    )


def clone_state(state):
    return {key: None if value is None else [t.clone() for t in value] for key, value in state.items()}


def bucket_of(state, grads, **hp):
    return Bucket(grads=grads, **state, **hp)


def check_step(got_state, got_stats, want_state, want_stats, grads, lam):
    for i, (p, q) in enumerate(zip(got_state["params"], want_state["params"])):
        torch.testing.assert_close(p.float(), q.float(), **PARAM_TOL[p.dtype], msg=lambda m: f"param {i}: {m}")
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        if got_state[key] is not None:
            for x, y in zip(got_state[key], want_state[key]):
                torch.testing.assert_close(x, y, **MOMENT_TOL)
    assert [s.item() for s in got_state["steps"]] == [s.item() for s in want_state["steps"]]
    got_stats, want_stats = got_stats.cpu(), want_stats.cpu()
    for i in range(len(grads)):
        g, w = got_stats[i], want_stats[i]
        assert (g[STAT_C] < 0) == (w[STAT_C] < 0), f"tensor {i}: branch differs"
        scale = float(grads[i].float().norm() * (w[STAT_NORM_P_A] + 1.0))
        assert abs(g[STAT_C] - w[STAT_C]) <= 1e-5 * scale + 1e-6
        torch.testing.assert_close(g[STAT_NORM_P_A:STAT_R], w[STAT_NORM_P_A:STAT_R], rtol=1e-5, atol=1e-6)
        assert abs(g[STAT_R] - w[STAT_R]) <= 1e-4
        assert abs(g[STAT_SCALE] - w[STAT_SCALE]) <= 1e-4 * max(lam, 1.0)


CASES = [
    # p dtype, anchor dtype (None: anchor-free), amsgrad, lr as a 0-d tensor
    (torch.float32, torch.float32, False, False),
    (torch.float32, torch.float32, True, True),
    (torch.float32, torch.bfloat16, False, False),
    (torch.float32, None, False, False),
    (torch.bfloat16, torch.bfloat16, False, False),
    (torch.bfloat16, torch.float32, True, False),
    (torch.bfloat16, None, False, True),
    (torch.float16, torch.float16, False, False),
    (torch.float16, torch.float32, True, False),
]


@pytest.mark.parametrize("p_dtype, a_dtype, amsgrad, lr_tensor", CASES)
def test_kernel_step_matches_reference(p_dtype, a_dtype, amsgrad, lr_tensor):
    gen = torch.Generator().manual_seed(hash((str(p_dtype), str(a_dtype), amsgrad)) % 2**31)
    lam = 1.5
    state = new_state(SIZES, p_dtype, a_dtype, amsgrad, gen)
    lr = torch.tensor(0.02, device=DEVICE) if lr_tensor else 0.02
    hp = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=lam, amsgrad=amsgrad)
    fired = not_fired = r_positive = 0
    for step in range(10):
        anchors = state["anchors"] or [None] * len(SIZES)
        signs = [1.0 if torch.rand((), generator=gen) < 0.5 else -1.0 for _ in SIZES]
        grads = [signed_grad(p.cpu(), None if a is None else a.cpu(), s, gen).to(DEVICE)
                 for p, a, s in zip(state["params"], anchors, signs)]
        want = clone_state(state)
        want_stats = reference_step(**{**want, "grads": grads}, **{**hp, "lr": 0.02})
        got_stats = k.adam_spd_triton_step(bucket_of(state, grads, **hp)).clone()
        check_step(state, got_stats, want, want_stats, grads, lam)
        nonempty = [i for i, n in enumerate(SIZES) if n > 0]
        fired += sum(bool(want_stats[i, STAT_C] < 0) for i in nonempty)
        not_fired += sum(bool(want_stats[i, STAT_C] >= 0) for i in nonempty)
        r_positive += sum(bool(want_stats[i, STAT_R] > 0) for i in nonempty)
    assert fired > 5 and not_fired > 5 and r_positive > 0, (fired, not_fired, r_positive)


def test_optimizer_trajectory_matches_reference():
    gen = torch.Generator().manual_seed(7)
    shapes = [(33, 65), (2 * CHUNK + 3,), (5,), (0, 4), (64, 64)]
    ours = [p.to(DEVICE) for p in make_params(shapes, generator=gen)]
    ours = [torch.nn.Parameter(p.detach()) for p in ours]
    theirs = clone_params(ours)
    pre = [(p.detach() + 0.3 * torch.randn(p.shape, generator=gen).to(DEVICE)) for p in ours]
    kw = dict(lr=3e-2, weight_decay=1.0, amsgrad=True)
    opt = AdamSPD([{"params": ours, "pre": [a.clone() for a in pre]}], impl="triton", **kw)
    ref = AdamSPD([{"params": theirs, "pre": [a.clone() for a in pre]}], impl="reference", **kw)
    fired = 0
    for step in range(12):
        for i, (p, q, a) in enumerate(zip(ours, theirs, pre)):
            p.grad = signed_grad(p.detach().cpu(), a.cpu(), (-1.0) ** (i + step), gen).to(DEVICE)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        stats = opt.last_step_stats()
        fired += sum(int(stats[p][STAT_C] < 0) for p in ours)
    assert fired > 10
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].device == p.device
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 12


def _run_twice():
    results = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(11)
        state = new_state([3 * CHUNK + 17, 100], torch.float32, torch.float32, False, gen)
        for step in range(3):
            grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in state["params"]]
            k.adam_spd_triton_step(bucket_of(state, grads, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8,
                                             weight_decay=2.0, amsgrad=False))
        results.append(state)
    return results


def test_two_runs_are_bitwise_identical():
    a, b = _run_twice()
    for x, y in zip(a["params"] + a["exp_avgs"], b["params"] + b["exp_avgs"]):
        assert torch.equal(x, y)


def test_plan_is_reused_until_a_storage_changes():
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE)) for n in (10, CHUNK + 1)]
    opt = AdamSPD(params, lr=0.01, weight_decay=1.0, impl="triton")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
    opt.step()
    (_, _, bucket), = opt._bucket_cache[1]
    plan = bucket.backend_cache
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    opt.step()
    assert opt._bucket_cache[1][0][2] is bucket and bucket.backend_cache is plan
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = AdamSPD(twin, lr=0.01, weight_decay=1.0, impl="reference")
    for p, q in zip(params, twin):
        ref.state[q].update({key: v.clone() for key, v in opt.state[p].items()})
        q.grad = torch.randn(q.shape, generator=gen).to(DEVICE)
        p.grad = q.grad.clone()  # a new storage: the plan must be rebuilt, not reused stale
    opt.step()
    ref.step()
    assert bucket.backend_cache is not plan
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_contiguous_grad():
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(DEVICE))
    q = torch.nn.Parameter(p.detach().clone())
    opt = AdamSPD([p], lr=0.1, weight_decay=1.0, impl="triton")
    ref = AdamSPD([q], lr=0.1, weight_decay=1.0, impl="reference")
    g = torch.randn(5, 6, generator=gen).to(DEVICE).t()
    assert not g.is_contiguous()
    p.grad, q.grad = g, g.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero_betas_and_q_on_the_anchor():
    # betas = 0, eps = 0: q = p - lr*sign(g) lands on the anchor while c < 0: r must be 0, not NaN.
    state = dict(
        params=[torch.tensor([1.0], device=DEVICE)], exp_avgs=[torch.zeros(1, device=DEVICE)],
        exp_avg_sqs=[torch.zeros(1, device=DEVICE)], max_exp_avg_sqs=None,
        anchors=[torch.tensor([0.0], device=DEVICE)], steps=[torch.zeros((), device=DEVICE)],
    )
    stats = k.adam_spd_triton_step(bucket_of(state, [torch.tensor([1.0], device=DEVICE)], lr=1.0, beta1=0.0,
                                             beta2=0.0, eps=0.0, weight_decay=1.0, amsgrad=False)).cpu()
    assert stats[0, STAT_C] < 0 and stats[0, STAT_NORM_Q_A] == 0 and stats[0, STAT_R] == 0
    assert state["params"][0].item() == 0.0

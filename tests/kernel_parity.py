"""One-step parity of a fused backend against the reference, shared by the kernel tests.

Each step starts both implementations from the same state (the backend's), so
the comparison checks one step's function at every step count without drift.
"""
from __future__ import annotations

import zlib

import torch

from spd_kernels.bucket import Bucket
from spd_kernels.reference import reference_step
from spd_kernels.stats import STAT_C, STAT_NORM_P_A, STAT_R, STAT_SCALE

from .helpers import signed_grad

#: per storage dtype: params may differ by one rounding (the Triton interpreter
#: truncates where a GPU or the CPU rounds to nearest); moments are fp32 everywhere
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}
MOMENT_TOL = dict(rtol=1e-5, atol=1e-7)

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
    (torch.float32, torch.float16, False, True),
    (torch.bfloat16, torch.float16, True, False),
    (torch.float16, torch.bfloat16, False, False),
    (torch.float16, None, True, False),
]


def new_state(sizes, p_dtype, a_dtype, amsgrad, gen, device):
    params = [torch.randn(n, generator=gen).to(p_dtype).to(device) for n in sizes]
    return dict(
        params=params,
        exp_avgs=[torch.zeros(n, device=device) for n in sizes],
        exp_avg_sqs=[torch.zeros(n, device=device) for n in sizes],
        max_exp_avg_sqs=[torch.zeros(n, device=device) for n in sizes] if amsgrad else None,
        anchors=None if a_dtype is None else [
            (p.float() + 0.5 * torch.randn(p.shape, generator=gen).to(device)).to(a_dtype) for p in params
        ],
        steps=[torch.zeros((), device=device) for _ in sizes],
    )


def clone_state(state):
    return {key: None if value is None else [t.clone() for t in value] for key, value in state.items()}


def bucket_of(state, grads, **hp):
    return Bucket(grads=grads, **state, **hp)


def check_step(got_state, got_stats, want_state, want_stats, grads, lam):
    for i, (p, q) in enumerate(zip(got_state["params"], want_state["params"])):
        # s = lam * r carries the sums' rounding times lam into p: scale the absolute slack with lam
        tol = dict(PARAM_TOL[p.dtype])
        tol["atol"] *= max(1.0, lam)
        torch.testing.assert_close(p.float(), q.float(), **tol, msg=lambda m: f"param {i}: {m}")
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


def run_step_parity(step_fn, sizes, case, device, steps=10, lam=1.5, max_scale=float("inf"), seed=0):
    """``steps`` steps of ``step_fn(bucket) -> stats`` against the reference; both branches must occur."""
    p_dtype, a_dtype, amsgrad, lr_tensor = case
    # a seed stable across processes (str hashes are salted per process)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, seed)).encode()))
    state = new_state(sizes, p_dtype, a_dtype, amsgrad, gen, device)
    lr = torch.tensor(0.02, device=device) if lr_tensor else 0.02
    hp = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=lam, amsgrad=amsgrad, max_scale=max_scale)
    fired = not_fired = r_positive = 0
    nonempty = [i for i, n in enumerate(sizes) if n > 0]
    for _ in range(steps):
        anchors = state["anchors"] or [None] * len(sizes)
        signs = [1.0 if torch.rand((), generator=gen) < 0.5 else -1.0 for _ in sizes]
        grads = [signed_grad(p.cpu(), None if a is None else a.cpu(), s, gen).to(device)
                 for p, a, s in zip(state["params"], anchors, signs)]
        want = clone_state(state)
        want_stats = reference_step(**{**want, "grads": grads}, **{**hp, "lr": 0.02})
        got_stats = step_fn(bucket_of(state, grads, **hp)).clone()
        check_step(state, got_stats, want, want_stats, grads, lam)
        fired += sum(bool(want_stats[i, STAT_C] < 0) for i in nonempty)
        not_fired += sum(bool(want_stats[i, STAT_C] >= 0) for i in nonempty)
        r_positive += sum(bool(want_stats[i, STAT_R] > 0) for i in nonempty)
        assert float(got_stats[:, STAT_SCALE].max()) <= max_scale
    assert fired > 5 and not_fired > 5 and r_positive > 0, (fired, not_fired, r_positive)


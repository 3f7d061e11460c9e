"""The reference against an independent float64 re-derivation of the algorithm (docs/design.md); its split step."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spd_kernels import backends
from spd_kernels.hyperparameters import Hyperparameters
from spd_kernels.reference import adam_spd_step_
from spd_kernels.stats import STAT_C, STAT_NORM_P_A, STAT_NORM_Q_A, STAT_R, STAT_SCALE
from spd_kernels.testing import CASES, run_step_parity, two_shard_step

from .helpers import signed_grad


def spd_float64(p, g, m, v, vmax, a, t, lr, b1, b2, eps, lam, amsgrad):
    """Section 1 written out in float64, formula by formula (not the reference's ops)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    second = vmax if amsgrad else v
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    q = p - (lr / bc1) * m / (torch.sqrt(second) / math.sqrt(bc2) + eps)
    c = -torch.sum(g * (p - a)).item()
    npa = torch.sqrt(torch.sum((p - a) ** 2)).item()
    nqa = torch.sqrt(torch.sum((q - a) ** 2)).item()
    r = 0.0
    if c < 0:
        r = 0.0 if nqa == 0 else min(max((nqa - npa) / nqa, 0.0), 1.0)
        q = q - lam * r * (q - a)
    return q, m, v, vmax, (c, npa, nqa, r, lam * r if c < 0 else 0.0)


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@given(
    shape=shapes,
    lr=st.floats(1e-4, 0.3),
    b1=st.floats(0.0, 0.95),
    b2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    lam=st.floats(0.0, 3.0),
    amsgrad=st.booleans(),
    anchor_free=st.booleans(),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_float64_derivation(shape, lr, b1, b2, eps, lam, amsgrad, anchor_free, signs, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen)
    a = None if anchor_free else p + 0.5 * torch.randn(shape, generator=gen)
    m, v, vmax = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    step = torch.zeros(())
    p64, m64, v64, vmax64 = p.double(), m.double(), v.double(), vmax.double()
    a64 = a.double() if a is not None else torch.zeros(shape, dtype=torch.float64)
    for t, sign in enumerate(signs, start=1):
        g = signed_grad(p, a, sign, gen)
        p64, m64, v64, vmax64, want = spd_float64(
            p64, g.double(), m64, v64, vmax64, a64, t, lr, b1, b2, eps, lam, amsgrad
        )
        got = adam_spd_step_(
            p, g, m, v, vmax if amsgrad else None, a, step,
            Hyperparameters(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=lam, amsgrad=amsgrad),
        )
        assert step.item() == t
        torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-6)
        # moments may cancel to near zero: absolute slack is fp32 rounding of the grad's scale
        gmax = float(g.abs().max())
        torch.testing.assert_close(m.double(), m64, rtol=1e-5, atol=1e-6 * gmax)
        torch.testing.assert_close(v.double(), v64, rtol=1e-5, atol=1e-6 * gmax**2)
        if amsgrad:
            torch.testing.assert_close(vmax.double(), vmax64, rtol=1e-5, atol=1e-6 * gmax**2)
        c, npa, nqa, r, s = want
        assert (got[STAT_C].item() < 0) == (c < 0)
        scale = max(npa, nqa, 1.0)
        for col, value in ((STAT_NORM_P_A, npa), (STAT_NORM_Q_A, nqa)):
            assert abs(got[col].item() - value) <= 1e-5 * scale
        assert abs(got[STAT_R].item() - r) <= 1e-4
        assert abs(got[STAT_SCALE].item() - s) <= 1e-4 * max(lam, 1.0)
        # re-sync from the float64 run so fp32 rounding does not compound over steps
        p.copy_(p64)
        m.copy_(m64)
        v.copy_(v64)
        vmax.copy_(vmax64)
        p64, m64, v64, vmax64 = p.double(), m.double(), v.double(), vmax.double()


def test_zero_distance_after_step_gives_r_zero_not_nan():
    # betas = 0, eps = 0: q = p - lr * g/|g| lands exactly on the anchor, while c < 0.
    p = torch.tensor([1.0])
    a = torch.tensor([0.0])
    g = torch.tensor([1.0])
    m, v = torch.zeros(1), torch.zeros(1)
    stats = adam_spd_step_(
        p, g, m, v, None, a, torch.zeros(()),
        Hyperparameters(lr=1.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=1.0),
    )
    assert stats[STAT_C].item() < 0
    assert stats[STAT_NORM_Q_A].item() == 0.0
    assert stats[STAT_R].item() == 0.0
    assert p.item() == 0.0 and not torch.isnan(p).any()


def test_projection_pulls_toward_anchor_by_lambda_r():
    # One step by hand: g = [1, 1], p - a = [1, 1] gives c = -2 < 0.
    p = torch.tensor([2.0, 2.0])
    a = torch.tensor([1.0, 1.0])
    g = torch.tensor([1.0, 1.0])
    m, v = torch.zeros(2), torch.zeros(2)
    # m starts negative so the Adam step moves AWAY from the anchor: r > 0.
    m.fill_(-10.0)
    v.fill_(1.0)
    stats = adam_spd_step_(
        p, g, m, v, None, a, torch.zeros(()),
        Hyperparameters(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5),
    )
    m_new = 0.9 * -10.0 + 0.1 * 1.0
    v_new = 0.999 * 1.0 + 0.001 * 1.0
    q = 2.0 - (0.1 / 0.1) * m_new / (math.sqrt(v_new) / math.sqrt(0.001) + 1e-8)
    npa, nqa = math.sqrt(2.0), math.sqrt(2.0) * (q - 1.0)
    r = (nqa - npa) / nqa
    want = q - 0.5 * r * (q - 1.0)
    assert 0 < r < 1
    torch.testing.assert_close(p, torch.tensor([want, want]), rtol=1e-6, atol=0)
    assert abs(stats[STAT_R].item() - r) < 1e-5


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[6]], ids=["fp32", "bf16-amsgrad", "bf16-anchor-free"])
def test_split_reference_step_on_two_shards_matches_reference(case):
    # the reference's split step (Adam half, sums, projection) where the sums of two shards are added
    run_step_parity(two_shard_step(backends.get("reference").start), [1, 7, 0, 300, 64], case, torch.device("cpu"), steps=8)

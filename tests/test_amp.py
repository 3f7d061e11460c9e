"""AMP: torch.amp.GradScaler hands AdamSPD grad_scale/found_inf; every backend honours them."""
from __future__ import annotations

import copy

import pytest
import torch

from spd_kernels import AdamSPD, backends
from spd_kernels.hyperparameters import Hyperparameters

IMPLS = backends.available("cpu")


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    return model, torch.randn(64, 12), torch.randn(64, 4)


def batch(x, y, step):
    """A different minibatch each step (the same for both runs), so the condition fires sometimes."""
    idx = torch.randint(0, len(y), (16,), generator=torch.Generator().manual_seed(step))
    return x[idx], y[idx]


def loss_of(model, x, y):
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    return torch.nn.functional.mse_loss(out.float(), y)


@pytest.mark.parametrize("impl", IMPLS)
def test_scaler_step_equals_unscale_then_step(impl):
    model_a, x, y = model_and_data()
    model_b = copy.deepcopy(model_a)
    opt_a = AdamSPD(model_a.parameters(), lr=1e-2, weight_decay=1.0, impl=impl)
    opt_b = AdamSPD(model_b.parameters(), lr=1e-2, weight_decay=1.0, impl=impl)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(8):
        xb, yb = batch(x, y, step)
        for model, opt, scaler, unscale_first in ((model_a, opt_a, scaler_a, False), (model_b, opt_b, scaler_b, True)):
            opt.zero_grad()
            scaler.scale(loss_of(model, xb, yb)).backward()
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    assert sum(int(s["projections"]) for s in opt_a.spd_stats().values()) > 0
    exact = impl != "triton"  # the kernel multiplies by 1/scale inside; the interpreter may round apart
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt_a.state[next(model_a.parameters())]["step"].item() == 8


@pytest.mark.parametrize("impl", IMPLS)
def test_injected_inf_skips_the_step_bit_for_bit(impl):
    model, x, y = model_and_data(1)
    opt = AdamSPD(model.parameters(), lr=1e-2, weight_decay=1.0, impl=impl)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    stats = {k: {s: v.clone() for s, v in e.items()} for k, e in opt.spd_stats().items()}
    opt.zero_grad()
    scaler.scale(loss_of(model, x, y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10  # the scaler saw the inf
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    for k, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state[k][key]), key
    for name, entry in opt.spd_stats().items():
        for key, value in entry.items():
            assert torch.equal(value, stats[name][key]), (name, key)


@pytest.mark.parametrize("impl", IMPLS)
def test_split_step_skips_on_found_inf_and_still_yields_sums(impl):
    # sharded params: a skipped step must change nothing, yet give the all-reduce a
    # buffer (every rank joins the collective whether or not it skips)
    from spd_kernels.bucket import Bucket

    gen = torch.Generator().manual_seed(3)
    sizes = (5000, 7)
    bucket = Bucket(
        params=[torch.randn(n, generator=gen) for n in sizes], grads=[torch.randn(n, generator=gen) for n in sizes],
        exp_avgs=[torch.randn(n, generator=gen).abs() for n in sizes],
        exp_avg_sqs=[torch.randn(n, generator=gen).abs() for n in sizes],
        anchors=[torch.randn(n, generator=gen) for n in sizes], steps=[torch.full((), 4.0) for _ in sizes],
        hp=Hyperparameters(lr=0.1, weight_decay=1.0), found_inf=torch.ones(()), grad_scale=torch.full((), 1024.0),
        sums=torch.full((2, 3), float("nan"), dtype=torch.float64),
    )
    before = copy.deepcopy(bucket)
    finish = backends.get(impl).start(bucket)
    assert bucket.sums.isfinite().all()  # what the all-reduce gets
    stats = finish()
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for got, want in zip(getattr(bucket, key), getattr(before, key)):
            assert torch.equal(got, want), key
    assert not stats.any()  # no earlier step: the stats stay zero

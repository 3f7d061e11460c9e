"""state_dict round trips (ours, mid-run) and loading the official adamSPD.py format."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from spd_kernels import AdamSPD

from .helpers import clone_params, make_anchors, make_params, set_grads

SHAPES = [(9,), (4, 6), (0,), (3, 3, 2)]


def build(params, pre, impl="reference"):
    return AdamSPD(
        [
            {"params": params[:2], "pre": pre[:2], "amsgrad": True},
            {"params": params[2:], "pre": None},
        ],
        lr=2e-2, weight_decay=1.5, impl=impl,
    )


def drive(opt, params, pre, gen, steps):
    anchors = list(pre[:2]) + [None] * (len(params) - 2)
    for _ in range(steps):
        signs = [1.0 if torch.rand((), generator=gen) < 0.5 else -1.0 for _ in params]
        set_grads(params, anchors, signs, gen)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_run_round_trip_equals_uninterrupted_run(dtype):
    gen = torch.Generator().manual_seed(0)
    straight = make_params(SHAPES, dtype, gen)
    pre = make_anchors(straight, generator=gen)
    resumed = clone_params(straight)

    opt = build(straight, pre)
    drive(opt, straight, pre, torch.Generator().manual_seed(1), 20)

    first = build(resumed, pre)
    g2 = torch.Generator().manual_seed(1)
    drive(first, resumed, pre, g2, 10)
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in resumed], "opt": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = [torch.nn.Parameter(t.clone()) for t in saved["model"]]
    # the fresh optimizer snapshots other anchors: loading must replace them
    second = AdamSPD(
        [{"params": fresh[:2], "amsgrad": True}, {"params": fresh[2:], "pre": None}],
        lr=2e-2, weight_decay=1.5, impl="reference",
    )
    second.load_state_dict(saved["opt"])
    for p in fresh:
        s = second.state[p]
        assert s["step"].dtype == torch.float32 and s["step"].dim() == 0
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
    drive(second, fresh, pre, g2, 10)

    for a, b in zip(straight, fresh):
        assert torch.equal(a, b)
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], second.state[b][key]), key


def test_anchor_dtype_survives_round_trip():
    params = make_params([(5,), (3, 2)], torch.float32)
    opt = AdamSPD(params, weight_decay=1.0, anchor_dtype=torch.bfloat16)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    other = AdamSPD(clone_params(params), weight_decay=1.0, anchor_dtype=torch.bfloat16)
    other.load_state_dict(sd)
    for p in other.param_groups[0]["params"]:
        assert other.state[p]["anchor"].dtype == torch.bfloat16


def official_state_dict(params, anchors, steps, gen, dtype):
    """What the official class's state_dict() holds after `steps` steps."""
    state = {}
    for i, p in enumerate(params):
        state[i] = {
            "step": steps,
            "exp_avg": torch.randn(p.shape, generator=gen).to(dtype) * 0.1,
            "exp_avg_sq": torch.rand(p.shape, generator=gen).to(dtype) * 0.01,
            "hyper": torch.zeros(p.shape, dtype=dtype),
        }
    group = {
        "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.7, "amsgrad": False,
        "pre": anchors, "params": list(range(len(params))),
    }
    return {"state": state, "param_groups": [group]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loads_official_checkpoint(dtype):
    gen = torch.Generator().manual_seed(4)
    params = make_params([(8,), (3, 5)], dtype, gen)
    anchors = make_anchors(params, generator=gen)
    sd = official_state_dict(params, anchors, 7, gen, dtype)
    opt = AdamSPD(params, weight_decay=0.7)  # snapshot anchors, to be replaced
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["weight_decay"] == 0.7 and not opt.param_groups[0]["anchor_free"]
    for i, p in enumerate(params):
        s = opt.state[p]
        assert "hyper" not in s
        assert s["step"].item() == 7.0 and s["step"].dtype == torch.float32
        assert s["exp_avg"].dtype == torch.float32
        assert torch.equal(s["exp_avg"], sd["state"][i]["exp_avg"].float())
        assert torch.equal(s["anchor"], anchors[i])
    # the next step starts from step 8 (bias corrections) and uses the loaded anchors
    twin = clone_params(params)
    twin_opt = AdamSPD([{"params": twin, "pre": anchors}], lr=1e-2, weight_decay=0.7)
    for p, q in zip(params, twin):
        twin_opt.state[q].update(
            step=torch.tensor(7.0),
            exp_avg=opt.state[p]["exp_avg"].clone(),
            exp_avg_sq=opt.state[p]["exp_avg_sq"].clone(),
        )
    set_grads(params, anchors, [-1.0, 1.0], gen)
    for p, q in zip(params, twin):
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_loads_official_anchor_free_group():
    params = make_params([(4,)])
    sd = official_state_dict(params, None, 2, torch.Generator().manual_seed(0), torch.float32)
    opt = AdamSPD([{"params": params, "pre": None}])
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["anchor_free"] and "anchor" not in opt.state[params[0]]


def test_bad_state_dict_leaves_optimizer_untouched():
    params = make_params([(4,), (2, 3)])
    opt = AdamSPD(params, weight_decay=1.0)
    params[0].grad = torch.randn(4)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][1] = {"anchor": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*anchor.*shape"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for k, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, after["state"][k][key])

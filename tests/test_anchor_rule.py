"""State made at each param's first step, for the params ``param_groups`` holds then (single process).

What frameworks do to an optimizer before its first step, emulated in one
process: swap the params for others (Accelerate's FSDP2 preparation does, with
DTensors: tests/test_stacks_distributed.py runs the real thing), run
``torch.distributed.checkpoint``'s template step, build their own groups (the
Hugging Face Trainer). Each must end with state for the stepped params only,
the right anchors, and a run equal to one the framework did not touch.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from spd_kernels import AdamSPD
from spd_kernels.anchors import ORIGIN_KEY

from .helpers import clone_params, make_anchors, make_params, set_grads


def _state_tensors(opt):
    return [t for entry in opt.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]


def _drive(params, opt, anchors, gen, steps, start=0):
    fired = 0
    for t in range(start, start + steps):
        set_grads(params, anchors, [(-1.0) ** (i + t) for i in range(len(params))], gen)
        opt.step()
        fired += sum(int(s["projected"]) for s in opt.spd_stats().values())
    return fired


@pytest.mark.parametrize("given", [False, True])
def test_params_swapped_before_the_first_step_get_the_state_and_the_anchors(given):
    # what fsdp2_switch_optimizer_parameters does, without the sharding: placeholders first, then the
    # new params (same values, other tensors); the old ones must get no state, the new ones their anchors
    gen = torch.Generator().manual_seed(1)
    old = make_params([(6, 5), (5,), (3, 6)], generator=gen)
    twin = clone_params(old)
    pre = make_anchors(old, generator=gen) if given else None

    def group(params):
        return {"params": params, "pre": [a.clone() for a in pre]} if given else {"params": params}

    opt = AdamSPD([group(old)], lr=0.05, weight_decay=1.0, anchor_dtype=torch.bfloat16)
    ref = AdamSPD([group(twin)], lr=0.05, weight_decay=1.0, anchor_dtype=torch.bfloat16)
    assert not opt.state
    params = opt.param_groups[0]["params"]
    for i in range(len(params)):
        params[i] = torch.empty(1)  # Accelerate drops its references first
    new = clone_params(twin)
    opt.param_groups[0]["params"] = new
    anchors = pre or [p.detach().clone() for p in twin]
    fired = _drive(new, opt, anchors, torch.Generator().manual_seed(2), 6)
    assert _drive(twin, ref, anchors, torch.Generator().manual_seed(2), 6) == fired > 0
    assert set(opt.state) == set(new)  # nothing for the params swapped out
    for p, q in zip(new, twin):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq", "anchor"):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), key
        assert opt.state[p]["anchor"].dtype == torch.bfloat16
    assert opt.param_groups[0][ORIGIN_KEY].anchors == [None] * 3  # given anchors released once placed


def test_params_replaced_by_tensors_of_other_shapes_raise_a_named_error_and_change_nothing():
    params = make_params([(4, 3), (3,)])
    opt = AdamSPD(params, lr=0.1, weight_decay=1.0)
    flat = [torch.nn.Parameter(torch.randn(6))]  # e.g. FSDP1's use_orig_params views: 1-D local pieces
    opt.param_groups[0]["params"] = flat
    flat[0].grad = torch.randn(6)
    before = flat[0].detach().clone()
    with pytest.raises(RuntimeError, match=re.escape(
            "param_groups[0]['params'] no longer holds the params the group was built with (2 of shapes "
            "[(4, 3), (3,)]..., now 1 of shapes [(6,)]...)")):
        opt.step()
    assert torch.equal(flat[0], before) and not opt.state


def test_fsdp1_flat_params_are_refused():
    p = torch.nn.Parameter(torch.randn(10))
    p._fsdp_flattened = True  # what FSDP1 marks its FlatParameters (and use_orig_params views) with
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: a parameter flattened by FSDP1"):
        AdamSPD([p])


def test_dcp_template_step_creates_the_state_and_counts_no_step():
    # get_optimizer_state_dict on a fresh optimizer runs a step with zero grads at lr 0
    # (torch.distributed.checkpoint.state_dict._init_optim_state); counted, it would make the
    # first real step use step-2 bias corrections
    gen = torch.Generator().manual_seed(2)
    params = make_params([(5, 4), (7,)], generator=gen)
    twin = clone_params(params)
    pre = make_anchors(params, generator=gen)
    model = torch.nn.ParameterList(params)
    opt = AdamSPD([{"params": params, "pre": pre}], lr=0.05, weight_decay=1.0)
    ref = AdamSPD([{"params": twin, "pre": pre}], lr=0.05, weight_decay=1.0)
    saved = get_optimizer_state_dict(model, opt)
    for entry, p, a in zip(saved["state"].values(), params, pre):
        assert entry["step"].item() == 0 and not entry["exp_avg"].any() and not entry["exp_avg_sq"].any()
        assert torch.equal(entry["anchor"], a)
    assert all(p.grad is None for p in params) and opt.param_groups[0]["lr"] == 0.05
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert _drive(params, opt, pre, gen_a, 6) == _drive(twin, ref, pre, gen_b, 6) > 0
    for p, q in zip(params, twin):
        assert torch.equal(p, q) and opt.state[p]["step"].item() == 6

    # and a template loaded back into a fresh optimizer resumes the run
    fresh_params = clone_params(params)
    fresh = AdamSPD([{"params": fresh_params, "pre": [a + 1.0 for a in pre]}], lr=0.05, weight_decay=1.0)
    set_optimizer_state_dict(torch.nn.ParameterList(fresh_params), fresh, get_optimizer_state_dict(model, opt))
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    _drive(params, opt, pre, gen_a, 3)
    _drive(fresh_params, fresh, pre, gen_b, 3)
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["anchor"], fresh.state[q]["anchor"])


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_a_first_step_at_lr_zero_with_real_grads_counts_as_adam_does(impl):
    # a warmup schedule starting at lr 0 (the Trainer's linear warmup does): m and v move, step counts
    gen = torch.Generator().manual_seed(5)
    ours = make_params([(8, 3), (4,)], generator=gen)
    theirs = clone_params(ours)
    opt = AdamSPD(ours, lr=1e-2, weight_decay=0.0, impl=impl)
    adam = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 3)) for o in (opt, adam)]
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        adam.step()
        for s in scheds:
            s.step()
    for p, q in zip(ours, theirs):
        assert opt.state[p]["step"].item() == adam.state[q]["step"].item() == 5
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6 if impl == "auto" else 0)


def test_a_lambda_every_group_overrides_warns_and_names_the_fix():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay = [model[0].weight]
    rest = [model[0].bias, *model[1].parameters()]
    # the Hugging Face Trainer's groups: args.weight_decay (0.0 by default) and 0.0
    with pytest.warns(UserWarning, match=re.escape(
            "weight_decay=1.0 (SPD's lambda) was given, but every param group sets its own weight_decay "
            "([0.0, 0.0])")) as caught:
        AdamSPD([{"params": decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.0}], weight_decay=1.0)
    assert "spd_kernels.hf.optimizer_cls_and_kwargs" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one group runs with the given lambda: no warning
        AdamSPD([{"params": decay}, {"params": rest, "weight_decay": 0.0}], weight_decay=1.0)
        AdamSPD([{"params": decay, "weight_decay": 0.5}], weight_decay=0.0)


def test_state_dict_leaves_the_group_records_out():
    params = make_params([(3,)])
    opt = AdamSPD([{"params": params, "pre": [torch.zeros(3)]}], weight_decay=1.0)
    assert ORIGIN_KEY in opt.param_groups[0]
    assert all(ORIGIN_KEY not in g for g in opt.state_dict()["param_groups"])
    opt.load_state_dict(opt.state_dict())  # the given anchor stays with the running optimizer
    params[0].grad = torch.randn(3)
    opt.step()
    assert torch.equal(opt.state[params[0]]["anchor"], torch.zeros(3))

"""Bad input raises a named error before anything is touched."""
from __future__ import annotations

import copy

import pytest
import torch

from spd_kernels import AdamSPD, backends

from .helpers import make_params


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), r"lr must be >= 0"),
        (dict(lr=torch.tensor([0.1, 0.2])), r"lr as a tensor must have one element"),
        (dict(eps=-1.0), r"eps must be >= 0"),
        (dict(weight_decay=-0.1), r"weight_decay must be >= 0"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.5)), r"betas\[1\] must be in \[0, 1\)"),
        (dict(impl="cuda"), r"impl must be one of"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    params = make_params([(3,)])
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=match):
        AdamSPD(params, **kwargs)
    assert torch.equal(params[0], before)


def test_bad_group_hyperparameter_names_the_group():
    params = make_params([(3,), (2,)])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: weight_decay must be >= 0"):
        AdamSPD([{"params": params[:1]}, {"params": params[1:], "weight_decay": -1.0}])


@pytest.mark.parametrize(
    "param, error, match",
    [
        (torch.zeros(3, dtype=torch.complex64), TypeError, r"params'\]\[1\]: AdamSPD needs real floating-point"),
        (torch.zeros(3, dtype=torch.int64), TypeError, r"params'\]\[1\]: AdamSPD needs floating-point"),
    ],
)
def test_bad_param_dtype(param, error, match):
    with pytest.raises(error, match=match):
        AdamSPD([torch.zeros(2, requires_grad=True), param])


def _anchor_cases():
    p = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 3))]
    ok = [t.detach().clone() for t in p]
    return p, [
        (ok[:1], ValueError, r"\['pre'\]: 1 anchors for 2 params"),
        ([ok[0], torch.zeros(3, 2)], ValueError, r"\['pre'\]\[1\]: shape \(3, 2\) does not match"),
        ([ok[0], torch.zeros(2, 3, dtype=torch.int32)], TypeError, r"\['pre'\]\[1\]: anchors must be real floating"),
        ([ok[0], torch.zeros(2, 3, device="meta")], ValueError, r"\['pre'\]\[1\]: on meta"),
        ([ok[0], p[1]], ValueError, r"\['pre'\]\[1\]: the anchor shares storage"),
        (ok[0], TypeError, r"\['pre'\]: expected a list"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_anchors(case):
    params, cases = _anchor_cases()
    pre, error, match = cases[case]
    with pytest.raises(error, match=r"param_groups\[0\]" + match):
        AdamSPD([{"params": params, "pre": pre}])


def test_bad_add_param_group_leaves_optimizer_unchanged():
    params = make_params([(3,)])
    opt = AdamSPD(params, weight_decay=1.0)
    params[0].grad = torch.randn(3)
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    extra = make_params([(2,), (5,)])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['pre'\]\[1\]: shape"):
        opt.add_param_group({"params": extra, "pre": [torch.zeros(2), torch.zeros(4)]})
    assert len(opt.param_groups) == 1
    assert all(p not in opt.state for p in extra)
    assert opt.state_dict()["param_groups"] == state_before["param_groups"]


def _stepped_optimizer():
    params = make_params([(4,), (3, 2)])
    opt = AdamSPD(params, lr=0.1, weight_decay=1.0)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    return params, opt


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(params, opt, snap):
    values, sd = snap
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    now = opt.state_dict()
    for k, entry in sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, now["state"][k][key]), key


def test_sparse_grad_raises_before_any_update():
    params, opt = _stepped_optimizer()
    params[0].grad = torch.randn(4)  # a valid grad on a param processed first
    params[1].grad = torch.randn(3, 2).to_sparse()
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\]: .*sparse"):
        opt.step()
    _assert_unchanged(params, opt, snap)


def test_lr_made_negative_mid_run_raises_before_any_update():
    params, opt = _stepped_optimizer()
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.param_groups[0]["lr"] = -0.5
    snap = _snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be >= 0"):
        opt.step()
    _assert_unchanged(params, opt, snap)


def test_triton_impl_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: impl='triton' takes"):
        AdamSPD([torch.zeros(3, dtype=torch.float64, requires_grad=True)], impl="triton")


def test_triton_without_a_gpu_raises_at_construction(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: impl='triton' is valid on CUDA params")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter either: nothing can run the kernels
    params = make_params([(3,), (2,)])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: impl='triton' needs a CUDA device, "
                                         r"got a param on cpu"):
        AdamSPD(params, impl="triton")


@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_cpu_impl_rejects_params_off_the_cpu(device):
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, device=device))]
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[1\]: impl='cpu' runs CPU tensors only, "
                                         rf"got a param on {device}"):
        AdamSPD(params, impl="cpu")


def test_cpu_impl_param_moved_after_construction_raises_before_any_update():
    if "cpu" not in backends.available("cpu"):
        pytest.skip("CPU kernel not built")
    params = make_params([(4,), (3, 2), (5,)])
    opt = AdamSPD(params, lr=0.1, weight_decay=1.0, impl="cpu")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    # the param went to another device after construction (as Module.to swaps it in place)
    torch.utils.swap_tensors(params[2], torch.nn.Parameter(torch.zeros(5, device="meta")))
    params[2].grad = torch.zeros(5, device="meta")
    for p in params[:2]:
        p.grad = torch.randn(p.shape)
    snap = _snapshot(params[:2], opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\]: impl='cpu' runs CPU tensors only, "
                                           r"got a param on meta"):
        opt.step()
    _assert_unchanged(params[:2], opt, snap)


def test_tensor_betas_are_accepted_and_equal_float_betas():
    gen = torch.Generator().manual_seed(3)
    ours = make_params([(5,), (2, 3)], generator=gen)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = AdamSPD(ours, lr=0.05, betas=(0.9, torch.tensor(0.99)), weight_decay=1.0)
    ref = AdamSPD(theirs, lr=0.05, betas=(0.9, 0.99), weight_decay=1.0)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "betas, match",
    [
        ((0.9, torch.tensor([0.99, 0.9])), r"betas\[1\] as a tensor must be a one-element floating-point CPU tensor"),
        ((torch.tensor(1.5), 0.99), r"betas\[0\] must be in \[0, 1\), got 1.5"),
        ((0.9, "0.99"), r"betas\[1\] must be a float in \[0, 1\), got str '0.99'"),
    ],
)
def test_bad_betas_say_what_is_wrong(betas, match):
    with pytest.raises(ValueError, match=match):
        AdamSPD(make_params([(3,)]), betas=betas)


def test_state_dict_groups_without_our_keys_load_with_defaults():
    # a checkpoint written before capturable / anchor_free / cap_projection existed
    gen = torch.Generator().manual_seed(4)
    params = make_params([(6,), (2, 3)], generator=gen)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamSPD(params, lr=0.05, weight_decay=1.0)
    ref = AdamSPD(twin, lr=0.05, weight_decay=1.0)
    for p, q in zip(params, twin):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("capturable", "anchor_free", "cap_projection"):
            del group[key]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["anchor_free"] is False and opt.param_groups[0]["capturable"] is False
    for p, q in zip(params, twin):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step()  # no KeyError
    ref.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)

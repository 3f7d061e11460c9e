"""torch.compile: a compiled model with an eager step, and a compiled step itself.

The compiled step goes through the CPU op (its fake impl) or the Triton custom
op (``spd_kernels/ops/triton_custom_op.py``) without graph breaks
(``fullgraph=True``), gives the eager result bit for bit, and a tensor lr
changed between steps recompiles nothing. Triton runs under the interpreter
here (CPU tensors), where its launcher is the same code as on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from spd_kernels import AdamSPD, backends
from spd_kernels.hyperparameters import Hyperparameters
from spd_kernels.ops import adam_spd as k

#: the backends that compile (every available one but the reference, which reads c on the host)
IMPLS = [name for name in backends.available("cpu") if name != "reference"]


def make_run(impl, seed=0, **moments):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(seed + 1)
    pre = [p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
    opt = AdamSPD([{"params": list(model.parameters()), "pre": pre}], lr=torch.tensor(1e-2), weight_decay=1.0,
                  impl=impl, **moments)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)
    return model, opt, x, y


def train(model, opt, x, y, step, steps=6, lrs=None, scheduler=None):
    fired = 0
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        fired += sum(int(s["projected"]) for s in opt.spd_stats().values())
        if scheduler is not None:
            scheduler.step()
        elif lrs is not None:
            opt.param_groups[0]["lr"].fill_(lrs[i])
    return [p.detach().clone() for p in model.parameters()], fired


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_step_equals_eager_and_lr_changes_recompile_nothing(impl):
    lrs = [1e-2 * 0.6**i for i in range(1, 7)]
    model, opt, x, y = make_run(impl)
    want, fired = train(model, opt, x, y, opt.step, lrs=lrs)
    assert fired > 0

    model, opt, x, y = make_run(impl)
    compiled = torch.compile(lambda: opt.step(), fullgraph=True)  # fullgraph: a graph break raises
    graphs = []

    def step():
        compiled()
        graphs.append(counters["stats"]["unique_graphs"])

    got, _ = train(model, opt, x, y, step, lrs=lrs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # the first step creates the state (as torch.optim.Adam's does) and has a graph of its own;
    # then the five new lrs of the later steps compile nothing
    assert graphs == [1] + [2] * 5
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(lrs[-1])


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_step_with_compressed_moments_equals_eager(impl):
    # fp8 first and bf16 second moments on every tensor (min_8bit_size=0), under fullgraph (a graph
    # break raises): the compiled step runs the kernels as the eager one does, bit for bit
    moments = dict(exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16, min_8bit_size=0)
    model, opt, x, y = make_run(impl, **moments)
    want, fired = train(model, opt, x, y, opt.step)
    assert fired > 0 and opt.state[model[0].weight]["exp_avg"].dtype == torch.float8_e4m3fn
    model, opt, x, y = make_run(impl, **moments)
    compiled = torch.compile(lambda: opt.step(), fullgraph=True)
    got, _ = train(model, opt, x, y, compiled)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("impl", IMPLS[:1])
def test_compiled_step_with_a_scheduler(impl):
    # the scheduler wraps opt.step in a function Dynamo skips: compile without fullgraph
    def run(compile_step):
        model, opt, x, y = make_run(impl)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        step = torch.compile(lambda: opt.step()) if compile_step else opt.step
        return train(model, opt, x, y, step, scheduler=scheduler)[0], float(opt.param_groups[0]["lr"])

    (want, want_lr), (got, got_lr) = run(False), run(True)
    assert got_lr == want_lr == pytest.approx(1e-2 * 0.5**3)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_compiled_model_with_eager_step():
    impl = IMPLS[0] if IMPLS else "reference"
    model, opt, x, y = make_run(impl)
    want, fired = train(model, opt, x, y, opt.step)
    model, opt, x, y = make_run(impl)
    compiled_model = torch.compile(model)
    got, _ = train(compiled_model, opt, x, y, opt.step)
    assert fired > 0
    for g, w in zip(got, want):  # inductor's fused forward/backward may round differently
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in IMPLS, reason="needs Triton (GPU or interpreter)")
def test_triton_kernels_are_not_specialized_on_lr(monkeypatch):
    """lr is a runtime argument of every kernel: a new lr, float or tensor, compiles no new variant."""
    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel),
                             tuple(sorted((key, str(v)) for key, v in kwargs.items()))))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_phase1_kernel", "_finalize_kernel", "_phase2_kernel"):
        monkeypatch.setattr(k, name, Recorder(getattr(k, name)))
    for lr_kind in ("float", "tensor"):
        seen.clear()
        params = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 7)]
        opt = AdamSPD(params, lr=0.1 if lr_kind == "float" else torch.tensor(0.1), weight_decay=1.0, impl="triton")
        for lr in (0.1, 0.05, 1e-4):
            if lr_kind == "float":
                opt.param_groups[0]["lr"] = lr
            else:
                opt.param_groups[0]["lr"].fill_(lr)
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
        assert len(seen) == 9  # three kernels, three steps
        assert len(set(seen)) == 3, set(seen)  # one set of compile-time arguments per kernel


@pytest.mark.skipif("triton" not in IMPLS, reason="needs Triton (GPU or interpreter)")
def test_triton_custom_op_schema_and_fake_impl():
    from spd_kernels.ops.triton_custom_op import adam_spd_triton_step_op

    gen = torch.Generator().manual_seed(9)
    sizes = (5000, 3)
    args = (
        [torch.randn(n, generator=gen) for n in sizes], [torch.randn(n, generator=gen) for n in sizes],
        [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes], [],
        [torch.randn(n, generator=gen) for n in sizes], [torch.zeros(()) for _ in sizes], [], [], [],
        torch.zeros(len(sizes)),
        Hyperparameters(lr=0.01, weight_decay=1.0).packed(), None, None, None,
    )
    torch.library.opcheck(adam_spd_triton_step_op, args, test_utils=("test_schema", "test_faketensor"))


def test_reference_backend_under_compile_says_why_or_runs_eagerly():
    model, opt, x, y = make_run("reference")
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(Exception, match="the reference backend branches on each tensor's c < 0"):
        torch.compile(lambda: opt.step(), fullgraph=True)()
    # without fullgraph the reference runs eagerly inside the compiled step
    model, opt, x, y = make_run("reference")
    got, fired = train(model, opt, x, y, torch.compile(lambda: opt.step()), lrs=[1e-2] * 6)
    model_e, opt_e, x_e, y_e = make_run("reference")
    want, want_fired = train(model_e, opt_e, x_e, y_e, opt_e.step, lrs=[1e-2] * 6)
    assert fired == want_fired > 0
    for g, w in zip(got, want):
        assert torch.equal(g, w)

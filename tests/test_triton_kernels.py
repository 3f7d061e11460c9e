"""The fused Triton kernels against the reference.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (conftest.py).
The one-step parity lives in kernel_parity.py; a separate test here follows a
whole optimizer trajectory.
"""
from __future__ import annotations

import pytest
import torch

from spd_kernels import AdamSPD, backends, quantization
from spd_kernels.hyperparameters import Hyperparameters
from spd_kernels.reference import reference_step
from spd_kernels.ops import adam_spd as k
from spd_kernels.stats import STAT_C, STAT_NORM_Q_A, STAT_R
from spd_kernels.testing import CASES, bucket_of, case_id, new_state, run_step_parity, signed_grad, two_shard_step

from .helpers import clone_params, make_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif("triton" not in backends.available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")

CHUNK = k.BLOCK * k.TILES
#: single element, odd, just over a tile, empty, several chunks with a tail, exactly one chunk
SIZES = [1, 7, 4097, 0, 3 * CHUNK + 5, CHUNK, 1025]



@pytest.mark.parametrize("case", CASES, ids=[f"p={c[0]}-a={c[1]}-amsgrad={c[2]}-lr_tensor={c[3]}" for c in CASES])
def test_kernel_step_matches_reference(case):
    run_step_parity(k.adam_spd_triton_step, SIZES, case, DEVICE)


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
        state = new_state([3 * CHUNK + 17, 100], torch.float32, torch.float32, False, gen, DEVICE)
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
    (_, bucket), = opt.buckets()
    plan = bucket.backend_cache
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    opt.step()
    assert opt.buckets()[0][1] is bucket and bucket.backend_cache is plan
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


def test_capped_projection_matches_reference():
    # lam = 40 makes lam * r exceed 1 often: the cap must bind, in the kernel as in the reference
    run_step_parity(k.adam_spd_triton_step, SIZES, (torch.float32, torch.float32, False, False), DEVICE, steps=10, lam=40.0,
                    max_scale=1.0)


SPLIT_CASES = [CASES[i] for i in (0, 4, 8, 6)]  # fp32, bf16, fp16 + amsgrad, anchor-free with a tensor lr


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"p={c[0]}-a={c[1]}-amsgrad={c[2]}-lr_tensor={c[3]}"
                                                   for c in SPLIT_CASES])
def test_split_step_on_two_shards_matches_reference(case):
    # phase 1 -> per-tensor sums -> (the shards' sums added, as FSDP2's all-reduce) -> finalize -> phase 2
    sizes = [1, 7, 0, 2 * CHUNK + 5, 1025]
    run_step_parity(two_shard_step(k.adam_spd_triton_partials), sizes, case, DEVICE, steps=8)


EIGHT_BIT_CASES = [CASES[i] for i in (0, 2, 3, 4, 6, 7)]  # no amsgrad with 8-bit moments


@pytest.mark.parametrize("case", EIGHT_BIT_CASES, ids=[case_id(c) for c in EIGHT_BIT_CASES])
def test_8bit_step_matches_reference(case):
    # dequantize, fp32 update, block absmax and nearest code inside phase 1 (no extra launch);
    # tensors of one tile, partial blocks, several chunks
    run_step_parity(k.adam_spd_triton_step, [1, 7, 0, 300, 3 * CHUNK + 5, CHUNK + 1], case, DEVICE, steps=10,
                    eight_bit=True)


def _one_shard(start):
    """The split step on one shard (the sums need no reduction): its own kernels, whole tensors."""
    def step(bucket):
        bucket.sums = torch.zeros((len(bucket), 3), dtype=torch.float64, device=bucket.device)
        return start(bucket)()
    return step


@pytest.mark.parametrize("case", EIGHT_BIT_CASES[:2], ids=[case_id(c) for c in EIGHT_BIT_CASES[:2]])
def test_8bit_split_step_matches_reference(case):
    run_step_parity(_one_shard(k.adam_spd_triton_partials), [7, 300, 3 * CHUNK + 5], case, DEVICE, steps=10,
                    eight_bit=True)


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_8bit_codes_every_midpoint_like_the_reference(p_dtype):
    # beta1 = 0 on a fresh state: m is the grad, so the kernel quantizes chosen values; every
    # midpoint (x8, the block absmax) and both neighbours, ties to the lower code, bit for bit
    mids = quantization.midpoints(quantization.dynamic_map(True)) * 8.0
    values = torch.stack([torch.nextafter(mids, torch.full_like(mids, -9.0)), mids,
                          torch.nextafter(mids, torch.full_like(mids, 9.0))], dim=1).reshape(-1)
    per_block = quantization.BLOCK_SIZE - 1
    grad = torch.cat([torch.cat([torch.tensor([8.0]), values[i:i + per_block]])
                      for i in range(0, values.numel(), per_block)]).to(p_dtype).to(DEVICE)
    state = new_state([grad.numel()], p_dtype, torch.float32, False, torch.Generator().manual_seed(4), DEVICE,
                      eight_bit=True)
    want = {key: v if v is None or key == "formats" else [t.cpu().clone() for t in v] for key, v in state.items()}
    k.adam_spd_triton_step(bucket_of(state, [grad], lr=0.01, beta1=0.0, weight_decay=1.0))
    reference_step(**want, grads=[grad.cpu()], hp=Hyperparameters(lr=0.01, beta1=0.0, weight_decay=1.0))
    assert torch.equal(state["exp_avg_scales"][0].cpu(), want["exp_avg_scales"][0])
    assert torch.equal(state["exp_avgs"][0].cpu(), want["exp_avgs"][0])

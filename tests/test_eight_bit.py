"""8-bit optimizer states (``optim_bits=8``): the format, the reference, the optimizer.

The format is bitsandbytes' blockwise dynamic quantization, so bitsandbytes
itself (its CPU path) is the external check: the same maps, the same absmax,
and at lambda = 0 an 8-bit AdamSPD that tracks ``bitsandbytes.optim.Adam8bit``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from spd_kernels import AdamSPD, quantization

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # bitsandbytes announces the GPU kernels it lacks here
    # a test dependency (requirements.txt): the GPU machines, which run from the source tree, lack it
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f


def fresh(shape, signed, seed):
    """Values spread over six decades, as moments are (second moments squared, >= 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    x = torch.randn(n, generator=gen) * torch.logspace(-6, 0, n)[torch.randperm(n, generator=gen)]
    return (x if signed else x * x).view(shape)


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes_dynamic_maps_bit_for_bit(signed):
    ours = quantization.dynamic_map(signed)
    assert torch.equal(ours, bnb_f.create_dynamic_map(signed=signed))
    assert ours[quantization.zero_code(signed)] == 0.0
    assert bool((ours[1:] >= ours[:-1]).all())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(7,), (256,), (3, 300), (4096,)])
def test_quantize_picks_the_nearest_code_and_the_lower_one_on_a_tie(signed, shape):
    x = fresh(shape, signed, seed=sum(shape))
    qmap = quantization.dynamic_map(signed)
    mids = quantization.midpoints(qmap)
    flat = x.view(-1)
    # block 0 gets absmax 8 (a power of two: scaling is exact), and exact ties: values that
    # scale onto a midpoint, each of which must take the code below it
    flat[0] = 8.0
    planted = {}
    for j, k in enumerate((130, 200, 250)):
        if j + 1 < min(flat.numel(), quantization.BLOCK_SIZE):
            flat[j + 1] = mids[k] * 8.0
            planted[j + 1] = k
    blocks = torch.arange(flat.numel()) // quantization.BLOCK_SIZE
    amax = torch.zeros(quantization.num_blocks(flat.numel())).index_reduce_(
        0, blocks, flat.abs(), "amax", include_self=False)
    codes = torch.empty(shape, dtype=torch.uint8)
    absmax = torch.empty(amax.shape)
    quantization.quantize_(codes, absmax, x, signed)
    assert torch.equal(absmax, amax)
    got = codes.view(-1).long()
    for i, k in planted.items():
        assert got[i] == k, (i, k, int(got[i]))  # on the midpoint: the lower code
    # against exact (float64) nearest, ties to the lower code: the only disagreements are
    # values within one fp32 ulp of a midpoint (the fp32 midpoint itself is rounded)
    scaled = (flat * torch.reciprocal(amax)[blocks]).clamp(-1, 1)
    dist = (scaled.double()[:, None] - qmap.double()[None, :]).abs()
    nearest = (dist == dist.min(dim=1, keepdim=True).values).double().argmax(dim=1)
    if not signed:  # a positive second moment never takes the zero code
        lifted = (nearest == 0) & (scaled > 0)
        assert bool(lifted.any()) == bool(((scaled > 0) & (scaled < mids[0])).any())
        nearest = torch.where(lifted, 1, nearest)
    off = (got != nearest).nonzero().flatten()
    for i in off.tolist():
        boundary = mids[min(int(got[i]), int(nearest[i]))]
        assert abs(float(scaled[i]) - float(boundary)) <= float(torch.finfo(torch.float32).eps * boundary.abs())
    back = quantization.dequantize(codes, absmax, signed).view(-1)
    gap = (qmap[1:] - qmap[:-1]).max()
    # within half the widest code gap of the block's scale (fp32 rounding of the product aside)
    assert bool(((back - flat).abs() <= gap * amax[blocks] / 2 * (1 + 1e-4)).all())


def test_a_positive_second_moment_never_quantizes_to_zero():
    # 1e-9 of the block's absmax is far below the unsigned map's first midpoint (1.6e-7): nearest
    # would be 0, and the next step would divide by a second moment that forgot its history
    x = torch.tensor([1.0, 1e-9, 0.0, 3e-7])
    codes, absmax = torch.empty(4, dtype=torch.uint8), torch.empty(1)
    quantization.quantize_(codes, absmax, x, signed=False)
    assert codes.tolist()[1:3] == [1, 0]
    signed_codes = torch.empty(4, dtype=torch.uint8)
    quantization.quantize_(signed_codes, absmax, x, signed=True)  # the first moment may vanish
    assert signed_codes[1] == quantization.zero_code(True)


def test_an_all_zero_block_keeps_absmax_zero_and_the_zero_code():
    x = torch.zeros(600)
    x[300:] = torch.randn(300)
    codes, absmax = torch.empty(600, dtype=torch.uint8), torch.empty(3)
    quantization.quantize_(codes, absmax, x, True)
    assert absmax[0] == 0 and bool((codes[:256] == quantization.zero_code(True)).all())
    assert torch.equal(quantization.dequantize(codes, absmax, True)[:256], torch.zeros(256))


@pytest.mark.parametrize("signed", [True, False])
def test_our_codes_against_bitsandbytes_quantize_blockwise(signed):
    # The same absmax. bitsandbytes' CPU quantizer is a fast lookup, not exactly nearest
    # (here it agrees with ours on 70% of first-moment and 29% of second-moment codes, by
    # up to 7 codes): ours is never farther from the value than theirs, and closer in sum.
    x = fresh((5000,), signed, seed=3)
    codes, absmax = torch.empty(5000, dtype=torch.uint8), torch.empty(quantization.num_blocks(5000))
    quantization.quantize_(codes, absmax, x, signed)
    theirs, state = bnb_f.quantize_blockwise(x, code=bnb_f.create_dynamic_map(signed=signed), blocksize=256)
    assert torch.equal(absmax, state.absmax)
    ours_err = (quantization.dequantize(codes, absmax, signed) - x).abs()
    their_err = (bnb_f.dequantize_blockwise(theirs, state) - x).abs()
    assert bool((ours_err <= their_err * (1 + 1e-6)).all())
    assert float(ours_err.sum()) < float(their_err.sum())
    assert int((codes.int() - theirs.int()).abs().max()) <= 8


def _run(make, p0, grads):
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def test_lambda_zero_8bit_tracks_bitsandbytes_adam8bit_closer_than_fp32_adam():
    # 50 steps from one start with the same grads; distances relative to the distance moved.
    # Measured (torch 2.13 CPU, bitsandbytes 0.50.2): ours-bnb 0.0045, bnb-fp32 0.0205,
    # ours-fp32 0.0205: 8-bit quantization is what both share, and what fp32 Adam lacks.
    gen = torch.Generator().manual_seed(0)
    shapes = [(256, 128), (64, 512), (300,)]  # the last stays fp32 (< min_8bit_size) in both
    p0 = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (0.01 + 0.01 * (t % 3)) for s in shapes] for t in range(50)]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    ours = _run(lambda ps: AdamSPD(ps, weight_decay=0.0, optim_bits=8, **kw), p0, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _run(lambda ps: bnb.optim.Adam8bit(ps, min_8bit_size=4096, **kw), p0, grads)
    fp32 = _run(lambda ps: torch.optim.Adam(ps, **kw), p0, grads)
    start = torch.cat([p.flatten() for p in p0])

    def dist(x, y):
        return float((x - y).norm() / (y - start).norm())

    assert dist(ours, theirs) < 0.4 * dist(theirs, fp32)
    assert dist(ours, theirs) < 0.4 * dist(ours, fp32)
    assert dist(ours, fp32) < 0.1  # and 8-bit Adam is still Adam


def test_state_is_codes_and_absmax_for_large_tensors_only():
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(100))
    opt = AdamSPD([big, small], lr=1e-3, weight_decay=1.0, optim_bits=8, anchor_dtype=torch.bfloat16)
    big.grad, small.grad = torch.randn(64, 64), torch.randn(100)
    opt.step()
    s = opt.state[big]
    assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.uint8 and s["exp_avg"].shape == big.shape
    assert s["exp_avg_absmax"].shape == s["exp_avg_sq_absmax"].shape == (16,)
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[small]
    state_bytes = sum(t.numel() * t.element_size() for t in s.values())
    # 1 + 1 code bytes, 2 bytes of bf16 anchor, 2 x 4 bytes per 256 absmax, 4 bytes of step
    assert state_bytes == big.numel() * (4 + 8 / 256) + 4
    assert state_bytes / big.numel() <= 4.1


def test_bad_8bit_settings_are_named_and_change_nothing():
    p = torch.nn.Parameter(torch.randn(8192))
    with pytest.raises(ValueError, match=r"optim_bits must be 32 or 8, got 16"):
        AdamSPD([p], optim_bits=16)
    with pytest.raises(ValueError, match=r"min_8bit_size must be an int >= 0, got -1"):
        AdamSPD([p], optim_bits=8, min_8bit_size=-1)
    with pytest.raises(ValueError, match=r"amsgrad with optim_bits=8 is not supported"):
        AdamSPD([p], optim_bits=8, amsgrad=True)
    opt = AdamSPD([p], optim_bits=32)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: amsgrad with optim_bits=8"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "optim_bits": 8, "amsgrad": True})
    assert len(opt.param_groups) == 1


def _trained(optim_bits, seed=0, steps=4):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((70, 64), (9,))]
    opt = AdamSPD(params, lr=1e-2, weight_decay=1.0, optim_bits=optim_bits)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def test_8bit_state_dict_round_trips_exactly_and_training_continues_alike():
    params, opt = _trained(8)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = AdamSPD(twin, lr=1e-2, weight_decay=1.0, optim_bits=8)
    loaded.load_state_dict(opt.state_dict())
    for p, q in zip(params, twin):
        for key, value in opt.state[p].items():
            assert torch.equal(loaded.state[q][key], value), key
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        loaded.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))


def test_32bit_checkpoint_quantizes_into_8bit_and_8bit_dequantizes_into_32bit():
    params, opt32 = _trained(32)
    opt8 = AdamSPD(params, lr=1e-2, weight_decay=1.0, optim_bits=8)
    opt8.load_state_dict(opt32.state_dict())
    big = params[0]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes = torch.empty(big.shape, dtype=torch.uint8)
        absmax = torch.empty(quantization.num_blocks(big.numel()))
        quantization.quantize_(codes, absmax, opt32.state[big][key], signed)
        assert torch.equal(opt8.state[big][key], codes) and torch.equal(opt8.state[big][key + "_absmax"], absmax)
    assert opt8.state[params[1]]["exp_avg"].dtype == torch.float32  # below min_8bit_size
    assert opt8.param_groups[0]["optim_bits"] == 8  # the format stays the running optimizer's

    back = AdamSPD(params, lr=1e-2, weight_decay=1.0)
    back.load_state_dict(opt8.state_dict())
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        want = quantization.dequantize(opt8.state[big][key], opt8.state[big][key + "_absmax"], signed)
        assert back.state[big][key].dtype == torch.float32 and torch.equal(back.state[big][key], want)
        assert key + "_absmax" not in back.state[big]
        # quantization keeps each moment within its block's scale
        torch.testing.assert_close(want, opt32.state[big][key], rtol=0.0, atol=float(opt32.state[big][key].abs().max()) / 50)


def test_auto_runs_8bit_tensors_on_a_backend_that_takes_them():
    params, opt = _trained(8, steps=1)
    names = {backend.name: [p.shape for p in bucket.owners] for backend, bucket in opt.buckets()}
    assert any(bucket.eight_bit for _, bucket in opt.buckets())
    for backend, bucket in opt.buckets():
        assert "bnb8" in backend.formats or not bucket.eight_bit, names


def test_grad_scaler_inf_step_leaves_8bit_state_untouched():
    params, opt = _trained(8, steps=2)
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(1.0)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.state[params[0]][key], value), key


def test_two_shard_emulation_refuses_8bit_states():
    # halving an absmax list would not give each half its own blocks: refused, never silently wrong
    from spd_kernels import backends
    from spd_kernels.testing import bucket_of, new_state, two_shard_step

    gen = torch.Generator().manual_seed(0)
    state = new_state([4096], torch.float32, torch.float32, False, gen, torch.device("cpu"), eight_bit=True)
    grads = [torch.randn(4096, generator=gen)]
    before = {k: [t.clone() for t in v] for k, v in state.items() if v is not None and k != "formats"}
    with pytest.raises(ValueError, match="8-bit and other compressed states"):
        two_shard_step(backends.get("reference").start)(bucket_of(state, grads, lr=1e-3))
    assert all(torch.equal(a, b) for k, v in before.items() for a, b in zip(v, state[k]))


def test_bucket_table_gives_the_reference_code_in_one_read():
    # the kernels' rule (Triton reads this table; the C++ kernel builds the same one): the
    # count below the bucket, plus one if the bucket's midpoint is below y, by low 16 bits
    for k, signed in enumerate((True, False)):
        mids = quantization.midpoints(quantization.dynamic_map(signed))
        gen = torch.Generator().manual_seed(k)
        spread = torch.exp(torch.empty(20000).uniform_(-25.0, 0.0, generator=gen))
        y = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, -2.0)),
                       torch.nextafter(mids, torch.full_like(mids, 2.0)), spread, -spread,
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])]).clamp(-1.0, 1.0)
        bits = y.view(torch.int32).to(torch.int64)
        sign = (bits >> 31) & 1
        key = (((bits & 0x7FFFFFFF) >> 16).clamp(quantization.KEY_MIN, quantization.KEY_MAX) - quantization.KEY_MIN)
        entry = quantization.bucket_table()[k][sign, key].to(torch.int64)
        ylow = (bits & 0xFFFF) ^ (sign * 0xFFFF)
        code = ((entry >> 24) & 0xFF) + ((entry & quantization.FIELD_MASK) < ylow).to(torch.int64)
        assert torch.equal(code, torch.bucketize(y, mids)), signed  # ties (y on a midpoint) to the lower code

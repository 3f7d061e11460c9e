"""Moment formats (``spd_kernels.formats``): the records, the rounding rules, every backend that runs
them against the reference, the optimizer's API, checkpoints between formats, and quality.

The reference (``spd_kernels.reference`` through each record's ``decode``/``encode_``) is the
oracle; the CPU kernel is held to it code for code, exactly where the inputs put values on
rounding ties.
"""
from __future__ import annotations


import pytest
import torch

from spd_kernels import AdamSPD, _cpu, backends, formats
from spd_kernels.formats import rounding
from spd_kernels.hyperparameters import Hyperparameters
from spd_kernels.reference import reference_step
from spd_kernels.testing import CASES, bucket_of, clone_state, new_state, run_step_parity

CPU = torch.device("cpu")
FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
#: every accepted (exp_avg, exp_avg_sq) pair of dtype formats but fp32/fp32
PAIRS = [("bf16", "bf16"), ("fp8", "bf16"), ("fp32", "bf16"), ("bf16", "fp32"), ("fp8", "fp32")]
DTYPE = {"fp32": torch.float32, "bf16": BF16, "fp8": FP8}
needs_cpu_kernel = pytest.mark.skipif(bool(_cpu.load_error()), reason="the compiled CPU kernel is not built")


def _lowbias32(x: int) -> int:  # the hash in plain integers, written from its definition
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_random_bits_are_the_hash_of_step_moment_and_index():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2**32, (1000,), generator=gen, dtype=torch.int64)
    assert rounding.lowbias32(xs).tolist() == [_lowbias32(int(x)) for x in xs]
    for step, moment, offset in ((1, 0, 0), (7, 1, 0), (123456, 1, 0), (7, 1, 2**32 - 151), (3, 1, 77)):
        key = _lowbias32(4 * step + moment)
        # one hash for elements 2j and 2j + 1: its low 16 bits the even one's, its high 16 the odd one's
        # (the index taken mod 2^32, as the kernels' uint32 does: the second offset crosses it)
        want = [(_lowbias32(i % 2**32 // 2 + key) >> (16 * (i % 2))) & 0xFFFF for i in range(offset, offset + 300)]
        assert rounding.random_bits(300, step, moment, offset=offset).tolist() == want
    assert not torch.equal(rounding.random_bits(300, 5, 1), rounding.random_bits(300, 6, 1))


def test_bf16_stochastic_rounding_lands_on_a_neighbour_and_is_right_on_average():
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(200_000, generator=gen) + 0.5) * 10.0 ** torch.randint(-12, 3, (200_000,), generator=gen)
    down = x.to(BF16)  # one neighbour; the other is one bf16 unit away from it
    r = rounding.to_bf16_stochastic(x, step=3, moment=1)
    below = torch.where(down.float() <= x, down.float(), (down.view(torch.int16) - 1).view(BF16).float())
    above = (below.to(BF16).view(torch.int16) + 1).view(BF16).float()
    assert bool(((r.float() == below) | (r.float() == above)).all())
    assert torch.equal(r, rounding.to_bf16_stochastic(x, step=3, moment=1))  # reproducible
    # unbiased: the mean relative error is far below half a unit (0.2%); nearest's bias is not the test
    rel = (r.double() - x.double()) / x.double()
    assert abs(float(rel.mean())) < 2e-5, float(rel.mean())
    # exact values stay exact
    exact = x.to(BF16).float()
    assert torch.equal(rounding.to_bf16_stochastic(exact, 9, 1), exact.to(BF16))


def test_fp8_keeps_each_block_within_half_a_unit_of_its_scale():
    fmt = formats.FORMATS["fp8"]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 300, generator=gen) * torch.logspace(-4, 0, 900).view(3, 300)
    x.view(-1)[256:512] = 0.0  # an all-zero block keeps scale 0 and decodes to 0
    codes, scale = fmt.zeros(x, 0), torch.empty(4)
    fmt.encode_(codes, scale, x, 0, 1)
    assert codes.dtype == FP8 and scale[1] == 0.0
    back = fmt.decode(codes, scale, 0)
    blocks = torch.arange(900) // 256
    amax = torch.stack([x.view(-1)[blocks == b].abs().max() for b in range(4)])
    torch.testing.assert_close(scale, amax / 448.0, rtol=0, atol=0)
    # e4m3 has 3 mantissa bits: nearest is within 1/16 of the value (normal range) or half of 2^-9 * scale
    err = (back.view(-1) - x.view(-1)).abs()
    bound = torch.maximum(x.view(-1).abs() / 16, 2.0**-10 * scale[blocks]) * (1 + 1e-6)
    assert bool((err <= bound).all())
    assert bool((back.view(-1)[256:512] == 0).all())


def test_the_records_say_what_they_cost_and_own():
    assert formats.FORMATS["fp32"].keys(0) == ("exp_avg",)
    assert formats.FORMATS["fp8"].keys(0) == ("exp_avg", "exp_avg_scale")
    assert formats.FORMATS["bnb8"].keys(1) == ("exp_avg_sq", "exp_avg_sq_absmax")
    assert [f.bytes_per_element for f in formats.FORMATS.values()] == [4.0, 2.0, 1.015625, 1.015625]
    assert formats.FORMATS["bf16"].rounding == ("nearest", "stochastic")
    assert set(formats.BY_DTYPE) == {torch.float32, BF16, FP8}


# ------------------------------------------------------------------ the CPU kernel against the oracle

@needs_cpu_kernel
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("case", [c for c in CASES if not c[2]], ids=str)
def test_cpu_kernel_steps_like_the_reference_in_every_format(pair, case):
    # one tensor per schedule: tiny, one task, several tasks' worth, chunk-parallel; and a tail block
    run_step_parity(_cpu.adam_spd_cpu_step, [5, 300, 4096, 20000, 140_001], case, CPU, steps=6, formats=pair)


def _tie_grads(pair, gen):
    """beta1 = beta2 = 0 makes m = g and v = g * g exactly: grads whose m sits on every rounding tie
    of its format (a block of fp8 m gets absmax 448, so its scale is 1 and x * inv is exact)."""
    n = 4096
    g = torch.randn(n, generator=gen)
    if pair[0] == "fp8":
        # midpoints between neighbouring e4m3 values (normal and subnormal), their negatives
        values = torch.arange(1, 127, dtype=torch.uint8).view(FP8).float()  # not 0: -0 is a sign question
        mids = (values[:-1] + values[1:]) / 2
        ties = torch.cat([mids, -mids, values, -values])
        g = ties[torch.randint(0, ties.numel(), (n,), generator=gen)]
        g[::256] = 448.0
    elif pair[0] == "bf16":
        lo = torch.randn(n, generator=gen).to(BF16)
        hi = (lo.view(torch.int16) + 1).view(BF16)
        g = (lo.float() + hi.float()) / 2  # exactly representable in fp32: a tie of bf16
    return g


@needs_cpu_kernel
@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "flush_denormal"])
def test_cpu_codes_equal_the_reference_on_rounding_ties(pair, flush_denormal):
    # flush_denormal: the e4m3 codecs form no fp32 subnormal, so flush-to-zero changes no code
    # (a 4096-element bucket runs on this thread, the one torch.set_flush_denormal sets)
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        _check_cpu_codes_on_ties(pair)
    finally:
        torch.set_flush_denormal(False)


def _check_cpu_codes_on_ties(pair):
    gen = torch.Generator().manual_seed(3)
    state = new_state([4096], torch.float32, None, False, gen, CPU, formats=pair)
    for step in range(3):
        grads = [_tie_grads(pair, gen)]
        want = clone_state(state)
        hp = dict(lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0)
        reference_step(**want, grads=grads, hp=Hyperparameters(**hp))
        _cpu.adam_spd_cpu_step(bucket_of(state, grads, **hp))
        for key in ("exp_avgs", "exp_avg_sqs", "params"):
            assert torch.equal(state[key][0].view(torch.uint8), want[key][0].view(torch.uint8)), (step, key)
        if state["exp_avg_scales"]:
            assert torch.equal(state["exp_avg_scales"][0], want["exp_avg_scales"][0])


@needs_cpu_kernel
def test_cpu_fp8_codes_equal_the_reference_on_random_bit_patterns():
    # Every binade of e4m3 and below it (its subnormals, values that round to 0): fp32 bit patterns
    # drawn uniformly with |x| <= 448, each block's max 448 so that its scale is 1 and the code is
    # the cast of x itself (beta1 = 0: exp_avg is the grad).
    gen = torch.Generator().manual_seed(10)
    n = 1 << 18
    bits = torch.randint(0, 0x43E00001, (n,), generator=gen, dtype=torch.int64)  # 0x43E00000 is 448.0
    g = bits.to(torch.int32).view(torch.float32) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    g[::256] = 448.0
    state = new_state([n], torch.float32, None, False, gen, CPU, formats=("fp8", "bf16"))
    want = clone_state(state)
    hp = dict(lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0)
    reference_step(**want, grads=[g], hp=Hyperparameters(**hp))
    _cpu.adam_spd_cpu_step(bucket_of(state, [g], **hp))
    assert torch.equal(want["exp_avgs"][0].view(torch.uint8), g.to(FP8).view(torch.uint8))  # the rule is the cast
    assert torch.equal(state["exp_avgs"][0].view(torch.uint8), want["exp_avgs"][0].view(torch.uint8))


@needs_cpu_kernel
@pytest.mark.parametrize("special", ["subnormal", "nan"])
def test_cpu_bf16_codes_equal_the_reference_on_subnormal_and_nan_moments(special):
    # The AVX-512 BF16 rounding of exp_avg flushes fp32 subnormals, where the reference's cast keeps
    # them; a NaN must stay a NaN and leave its neighbours alone. Special values at 3% of the
    # elements leave about a third of the 32-element groups without one, so both the hardware and
    # the bit-arithmetic rounding run. beta1 = 0 and the same grads every step make exp_avg the
    # grad (m + (g - m) is g when m is g rounded to bf16).
    gen = torch.Generator().manual_seed(6)
    state = new_state([4096, 1000], torch.float32, None, False, gen, CPU, formats=("bf16", "bf16"))
    grads = []
    for p in state["params"]:
        g = torch.randn(p.shape, generator=gen)
        where = torch.rand(p.shape, generator=gen) < 0.03
        if special == "subnormal":  # 2^-148 <= |x| < 2^-126, spread over the binades below 2^-126
            scale = torch.pow(2.0, -torch.randint(127, 149, p.shape, generator=gen).float())
            g = torch.where(where, torch.sign(g) * (1.0 + torch.rand(p.shape, generator=gen)) * scale, g)
        else:  # NaNs of both signs and another payload than the default
            nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
            g = torch.where(where, nans[torch.randint(0, 3, p.shape, generator=gen)], g)
        grads.append(g)
    for step in range(3):
        want = clone_state(state)
        hp = dict(lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0)
        reference_step(**want, grads=grads, hp=Hyperparameters(**hp))
        _cpu.adam_spd_cpu_step(bucket_of(state, grads, **hp))
        if special == "subnormal":
            for key in ("exp_avgs", "exp_avg_sqs", "params"):
                for have, expect in zip(state[key], want[key]):
                    assert torch.equal(have.view(torch.uint8), expect.view(torch.uint8)), (step, key)
        else:  # no rule fixes a NaN's code (torch's cast gives 0xFFFF or 0x7FC0 by code path)
            for have, expect, g in zip(state["exp_avgs"], want["exp_avgs"], grads):
                nan = g.isnan()
                assert have[nan].isnan().all() and expect[nan].isnan().all(), step
                assert torch.equal(have[~nan].view(torch.int16), expect[~nan].view(torch.int16)), step


@needs_cpu_kernel
@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
def test_cpu_split_step_equals_the_whole_step(pair):
    gen = torch.Generator().manual_seed(4)
    state = new_state([300, 4096, 140_001], torch.float32, BF16, False, gen, CPU, formats=pair)
    twin = clone_state(state)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in state["params"]]
        whole = _cpu.adam_spd_cpu_step(bucket_of(state, grads, lr=0.02, weight_decay=1.5))
        split = bucket_of(twin, grads, lr=0.02, weight_decay=1.5)
        split.sums = torch.zeros((3, 3), dtype=torch.float64)
        assert torch.equal(whole, _cpu.adam_spd_cpu_partials(split)()), step
        for key, value in state.items():
            if value is not None and key != "formats":
                assert all(torch.equal(x, y) for x, y in zip(value, twin[key])), (step, key)


@needs_cpu_kernel
@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
@pytest.mark.parametrize("anchor", [None, BF16, torch.float32], ids=["no_anchor", "bf16_anchor", "fp32_anchor"])
def test_cpu_step_with_a_grad_scale_unscales_like_the_reference(pair, anchor):
    # The CPU steps skip the multiply by 1 / grad_scale when there is no scale: grads scaled by a
    # power of two with that grad_scale must give the unscaled step's bits, and a scale of 1000
    # the reference's step (the codes to within CODE_TIES).
    from spd_kernels.testing import check_step

    gen = torch.Generator().manual_seed(8)
    state = new_state([300, 4096, 20_001], torch.float32, anchor, False, gen, CPU, formats=pair)
    twin, ref = clone_state(state), clone_state(state)
    hp = dict(lr=0.02, weight_decay=1.5)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in state["params"]]
        plain = _cpu.adam_spd_cpu_step(bucket_of(state, grads, **hp))
        scaled = bucket_of(twin, [g * 1024.0 for g in grads], **hp)
        scaled.grad_scale = torch.tensor(1024.0)
        assert torch.equal(plain, _cpu.adam_spd_cpu_step(scaled)), step
        for key, value in state.items():
            if value is not None and key != "formats":
                assert all(torch.equal(x, y) for x, y in zip(value, twin[key])), (step, key)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) * 1000.0 for p in ref["params"]]
        want = clone_state(ref)
        want_stats = reference_step(**want, grads=grads, hp=Hyperparameters(**hp), grad_scale=torch.tensor(1000.0))
        bucket = bucket_of(ref, grads, **hp)
        bucket.grad_scale = torch.tensor(1000.0)
        got_stats = _cpu.adam_spd_cpu_step(bucket)
        check_step(ref, got_stats, want, want_stats, [g / 1000.0 for g in grads], lam=1.5)


@needs_cpu_kernel
def test_cpu_fp8_codes_of_nan_moments_are_nan():
    # A NaN grad makes a NaN exp_avg; its e4m3 code must be the NaN code (0x7F with its sign), as
    # torch's cast gives it, not a finite value. (Its block's scale is not pinned: a NaN in the
    # block's max is order-dependent on both sides.)
    gen = torch.Generator().manual_seed(9)
    state = new_state([4096], torch.float32, None, False, gen, CPU, formats=("fp8", "bf16"))
    g = torch.randn(4096, generator=gen)
    where = torch.zeros(4096, dtype=torch.bool)
    where[torch.randint(0, 4096, (40,), generator=gen)] = True
    g[where] = float("nan")
    _cpu.adam_spd_cpu_step(bucket_of(state, [g], lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0))
    codes = state["exp_avgs"][0].view(torch.uint8)
    assert bool(((codes[where] & 0x7F) == 0x7F).all()), codes[where].unique()
    assert torch.equal(state["exp_avgs"][0].float()[where].isnan(), torch.ones(int(where.sum()), dtype=torch.bool))


@needs_cpu_kernel
def test_cpu_op_names_a_moment_format_it_does_not_run():
    gen = torch.Generator().manual_seed(5)
    state = new_state([4096], torch.float32, None, False, gen, CPU, formats=("bf16", "bf16"))
    state["exp_avg_sqs"] = [torch.zeros(4096, dtype=FP8)]
    with pytest.raises(RuntimeError, match="fp8 second moments are not supported"):
        _cpu.adam_spd_cpu_step(bucket_of(state, [torch.randn(4096)], lr=1e-3))
    state["exp_avg_sqs"] = [torch.zeros(4096, dtype=torch.float16)]
    with pytest.raises(RuntimeError, match="exp_avg_sqs must be fp32, bf16, float8_e4m3fn"):
        _cpu.adam_spd_cpu_step(bucket_of(state, [torch.randn(4096)], lr=1e-3))


# ------------------------------------------------------------------------------ the optimizer

def _model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in ((64, 128), (300,), (40, 256))]


def _train(params, opt, steps=4, seed=7):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()


def test_state_takes_the_named_formats_and_small_tensors_keep_fp32_for_fp8():
    params = _model()
    opt = AdamSPD(params, lr=1e-3, weight_decay=1.0, anchor_dtype=BF16, exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)
    _train(params, opt, steps=1)
    big, small, mid = (opt.state[p] for p in params)
    assert big["exp_avg"].dtype == FP8 and big["exp_avg_scale"].shape == (32,) and big["exp_avg_sq"].dtype == BF16
    assert "exp_avg_sq_scale" not in big
    assert small["exp_avg"].dtype == torch.float32 and small["exp_avg_sq"].dtype == BF16  # 300 < min_8bit_size
    assert mid["exp_avg"].dtype == FP8 and mid["exp_avg_scale"].shape == (40,)
    # the group keeps the dtype's name: every checkpointer saves it (DCP's helpers refuse a torch.dtype)
    assert opt.param_groups[0]["exp_avg_dtype"] == "float8_e4m3fn"
    assert AdamSPD(params, exp_avg_sq_dtype="bfloat16").defaults["exp_avg_sq_dtype"] == "bfloat16"
    assert {b.formats for _, b in opt.buckets()} == {("fp8", "bf16"), ("fp32", "bf16")}
    if not _cpu.load_error():
        assert {backend.name for backend, _ in opt.buckets()} == {"cpu"}


@pytest.mark.parametrize("settings, match", [
    (dict(exp_avg_sq_dtype=FP8), "exp_avg_sq_dtype=torch.float8_e4m3fn is refused: a second moment in e4m3"),
    (dict(exp_avg_dtype=torch.float16), "exp_avg_dtype must be one of"),
    (dict(exp_avg_sq_dtype="bf16"), "exp_avg_sq_dtype must be one of"),
    (dict(optim_bits=8, exp_avg_dtype=BF16), "optim_bits=8 .* and exp_avg_dtype/exp_avg_sq_dtype"),
    (dict(amsgrad=True, exp_avg_sq_dtype=BF16), "amsgrad with compressed moments"),
])
def test_bad_format_settings_are_named_and_change_nothing(settings, match):
    params = _model()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        AdamSPD(params, lr=1e-3, **settings)
    opt = AdamSPD(params[:1], lr=1e-3)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": params[1:], **settings})
    assert len(opt.param_groups) == 1 and not opt.state
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_backend_without_the_format_is_passed_over_or_refused_by_name():
    import dataclasses

    for name in ("reference", "cpu", "triton"):  # every backend runs every format
        assert set(backends.get(name).formats) == set(formats.FORMATS), name
    older = dataclasses.replace(backends.get("cpu"), formats=("fp32", "bnb8"))
    assert "impl='cpu' does not run fp8/bf16 moments" in older.format_error(("fp8", "bf16"))
    assert older.format_error(("bnb8", "bnb8")) == ""
    p = torch.zeros(4096)
    assert "does not run bf16 moments" in older.layout_error(p, None, ("bf16", "bf16"))


def test_state_dict_round_trips_exactly_and_training_continues_alike():
    params = _model()
    kw = dict(lr=1e-3, weight_decay=1.0, exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)
    opt = AdamSPD(params, **kw)
    _train(params, opt)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = AdamSPD(twin, **kw)
    loaded.load_state_dict(opt.state_dict())
    for p, q in zip(params, twin):
        for key, value in opt.state[p].items():
            assert loaded.state[q][key].dtype == value.dtype and torch.equal(loaded.state[q][key], value), key
    _train(params, opt, seed=8)
    _train(twin, loaded, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(params, twin))


@pytest.mark.parametrize("saved, running", [
    (dict(exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16), {}),
    ({}, dict(exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)),
    (dict(exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16), dict(optim_bits=8)),
    (dict(optim_bits=8), dict(exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)),
])
def test_a_checkpoint_in_one_format_loads_into_another_through_fp32(saved, running):
    params = _model()
    opt = AdamSPD(params, lr=1e-3, weight_decay=1.0, **saved)
    _train(params, opt)
    target = AdamSPD(params, lr=1e-3, weight_decay=1.0, **running)
    target.load_state_dict(opt.state_dict())
    for p in params:
        want = formats.for_tensor(p.numel(), target.param_groups[0])
        have = [formats.held(target.state[p], k) for k in range(2)]
        assert have == list(want), (p.shape, have, want)
        for k, key in enumerate(formats.MOMENTS):
            src = formats.held(opt.state[p], k)
            value = src.decode(*formats.state_of(opt.state[p], src, k), k)
            got = have[k].decode(*formats.state_of(target.state[p], have[k], k), k)
            # one more rounding in the running format: within its block's scale
            atol = float(value.abs().max()) * (1 / 8 if have[k].name in ("fp8", "bnb8") else 1 / 128)
            torch.testing.assert_close(got, value, rtol=1 / 64, atol=atol)
    assert {k: target.param_groups[0][k] for k in formats.GROUP_KEYS} == \
        {k: AdamSPD(params, **running).defaults[k] for k in formats.GROUP_KEYS}  # the running format stays


def test_grad_scaler_inf_step_leaves_compressed_state_untouched():
    params = _model()
    opt = AdamSPD(params, lr=1e-3, weight_decay=1.0, exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)
    _train(params, opt, steps=2)
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.state[params[0]][key], value), key
    # a finite step with a scale divides the grads first: as the unscaled grads would step
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = AdamSPD(twin, lr=1e-3, weight_decay=1.0, exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)
    plain.load_state_dict(opt.state_dict())
    opt.found_inf = torch.tensor(0.0)
    gen = torch.Generator().manual_seed(3)
    for p, q in zip(params, twin):
        q.grad = torch.randn(p.shape, generator=gen)
        p.grad = q.grad * 1024.0
    opt.step()
    plain.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ quality

def drift(settings, steps, seed=0):
    """Distance from fp32 Adam after ``steps`` steps at lambda = 0, relative to the distance moved."""
    # the quality bench's setup: three tensors whose grads have per-row scales over three decades
    from bench.format_quality import KW, run_optimizer, setup

    p0, grads = setup(steps, seed)
    ours = run_optimizer(lambda ps: AdamSPD(ps, weight_decay=0.0, **KW, **settings), p0, grads)
    fp32 = run_optimizer(lambda ps: torch.optim.Adam(ps, **KW), p0, grads)
    start = torch.cat([p.flatten() for p in p0])
    return float((ours - fp32).norm() / (fp32 - start).norm())


def test_lambda_zero_drift_from_fp32_adam_stays_under_the_8bit_formats():
    # Measured (torch 2.13 CPU; docs/formats.md, bench/format_quality.py): 50 steps, drift /
    # distance moved: bf16 0.004, fp8 m + bf16 v 0.044, optim_bits=8 0.052, bitsandbytes'
    # Adam8bit 0.095, torchao's AdamWFp8 4.0.
    bf16 = drift(dict(exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16), 50)
    fp8 = drift(dict(exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16), 50)
    eight = drift(dict(optim_bits=8), 50)
    assert bf16 < 0.01, bf16
    assert fp8 < eight, (fp8, eight)
    assert eight < 0.1, eight


@needs_cpu_kernel
def test_stochastic_rounding_keeps_the_second_moment_following_the_grads():
    # 1500 steps of one tensor at beta2 = 0.999 with a grad scale that halves after step 300: an
    # fp32 v decays toward the new scale; a bf16 v rounded to nearest stops moving once each step's
    # change is under half a bf16 unit, and stochastic rounding keeps it moving on average.
    gen = torch.Generator().manual_seed(6)
    n, steps = 4096, 1500
    p32 = torch.nn.Parameter(torch.zeros(n))
    pbf = torch.nn.Parameter(torch.zeros(n))
    opt32 = AdamSPD([p32], lr=0.0, weight_decay=0.0)
    optbf = AdamSPD([pbf], lr=0.0, weight_decay=0.0, exp_avg_sq_dtype=BF16)
    nearest = torch.zeros(n, dtype=BF16)
    for t in range(steps):
        g = torch.randn(n, generator=gen) * (1.0 if t < 300 else 0.5)
        p32.grad, pbf.grad = g.clone(), g.clone()
        opt32.step()
        optbf.step()
        nearest = (0.999 * nearest.float() + 0.001 * g * g).to(BF16)
    v32 = opt32.state[p32]["exp_avg_sq"]
    sr = optbf.state[pbf]["exp_avg_sq"].float()
    err_sr = float(((sr - v32) / v32).mean())
    err_nearest = float(((nearest.float() - v32) / v32).mean())
    assert abs(err_sr) < 0.01, err_sr
    assert err_nearest > 0.05, err_nearest  # the trap the rounding avoids


# ------------------------------------------------------- Triton (CUDA, or the interpreter on CPU tensors)

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif("triton" not in backends.available(TRITON_DEVICE),
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def _triton():
    from spd_kernels.ops import adam_spd

    return adam_spd


@needs_triton
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("case", [c for c in CASES if not c[2]][:4], ids=str)
def test_triton_steps_like_the_reference_in_every_format(pair, case):
    k = _triton()
    chunk = k.BLOCK * k.TILES
    # a single-chunk tensor with a tail block, one exactly a tile, several chunks with a tail
    run_step_parity(k.adam_spd_triton_step, [5, 300, k.BLOCK, 2 * chunk + 300], case, TRITON_DEVICE, steps=6,
                    formats=pair)


@needs_triton
@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
def test_triton_codes_equal_the_reference_on_rounding_ties(pair):
    k = _triton()
    gen = torch.Generator().manual_seed(3)
    state = new_state([4096], torch.float32, None, False, gen, TRITON_DEVICE, formats=pair)
    for step in range(3):
        grads = [_tie_grads(pair, gen).to(TRITON_DEVICE)]
        want = {key: v if v is None or key == "formats" else [t.cpu().clone() for t in v] for key, v in state.items()}
        hp = dict(lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0)
        reference_step(**want, grads=[grads[0].cpu()], hp=Hyperparameters(**hp))
        k.adam_spd_triton_step(bucket_of(state, grads, **hp))
        for key in ("exp_avgs", "exp_avg_sqs", "params"):
            assert torch.equal(state[key][0].cpu().view(torch.uint8), want[key][0].view(torch.uint8)), (step, key)
        if state["exp_avg_scales"]:
            assert torch.equal(state["exp_avg_scales"][0].cpu(), want["exp_avg_scales"][0])


@needs_triton
@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
def test_triton_split_step_matches_the_reference(pair):
    k = _triton()

    def one_shard(bucket):  # the split step on one shard: its own kernels, whole tensors
        bucket.sums = torch.zeros((len(bucket), 3), dtype=torch.float64, device=bucket.device)
        return k.adam_spd_triton_partials(bucket)()

    run_step_parity(one_shard, [7, 300, 3 * k.BLOCK * k.TILES + 5], CASES[0], TRITON_DEVICE, steps=6, formats=pair)


@pytest.mark.parametrize("step_fn", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("pair, cut", [(("fp8", "bf16"), 4096), (("bf16", "bf16"), 4095), (("fp32", "bf16"), 4095)])
def test_a_shard_rounds_as_the_whole_tensor_does(step_fn, pair, cut):
    # FSDP2 cuts dim 0: each shard's stochastic rounding uses the element's index in the whole tensor
    # (index_offsets), and its fp8 blocks are the whole tensor's where the cut is on a block bound,
    # so two shards stepped apart give the whole tensor's codes exactly. An odd cut starts the
    # second shard inside a pair of elements that share a hash (the CPU kernel's second path).
    device = TRITON_DEVICE if step_fn == "triton" else CPU
    if step_fn not in backends.available(device):
        pytest.skip(f"{step_fn} does not run here")
    backend = backends.get(step_fn)
    gen = torch.Generator().manual_seed(11)
    n = 8192
    whole = new_state([n], torch.float32, torch.bfloat16, False, gen, device, formats=pair)
    def split(x):
        return list(x.split([cut * x.numel() // n, (n - cut) * x.numel() // n]))
    halves = {key: v if v is None or key in ("formats", "steps") else [t for x in v for t in split(x)]
              for key, v in clone_state(whole).items()}
    halves["steps"] = [whole["steps"][0].clone(), whole["steps"][0].clone()]
    for step in range(3):
        grad = (torch.randn(n, generator=gen) * 0.01).to(device)
        backend.run(bucket_of(whole, [grad], lr=1e-3, weight_decay=0.0))
        shard = bucket_of(halves, split(grad), lr=1e-3, weight_decay=0.0)
        shard.index_offsets = [0, cut]
        backend.run(shard)
        for key in ("exp_avgs", "exp_avg_sqs", "params"):
            assert torch.equal(torch.cat(halves[key]).view(torch.uint8), whole[key][0].view(torch.uint8)), (step, key)
        if pair[0] == "fp8":
            assert torch.equal(torch.cat(halves["exp_avg_scales"]), whole["exp_avg_scales"][0])
    # without the offsets, the second half rounds with other bits
    shard.index_offsets = None
    grad = (torch.randn(n, generator=gen) * 0.01).to(device)
    backend.run(bucket_of(whole, [grad], lr=1e-3, weight_decay=0.0))
    backend.run(bucket_of(halves, split(grad), lr=1e-3, weight_decay=0.0))
    assert not torch.equal(halves["exp_avg_sqs"][1], whole["exp_avg_sqs"][0][cut:])

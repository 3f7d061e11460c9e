"""The one verification harness: tolerances, inputs and the shard emulation.

Every check of a backend against the reference imports from here: the pytest
suite (small shapes on the CPU, realistic sizes under ``pytest -m cuda``),
``python -m spd_kernels verify`` and the GPU checks. One tolerance table, one
signed-gradient generator, one state builder, one two-shard emulation.

Inputs are built away from SPD's tie: a gradient's condition
``c = -sum(g * (p - a))`` gets a clear sign (a term worth three times the
noise's contribution), so two correct implementations take the same branch.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import formats as moment_formats
from .formats.record import num_blocks
from .bucket import Bucket
from .hyperparameters import Hyperparameters
from .reference import reference_step
from .stats import STAT_C, STAT_NORM_P_A, STAT_R, STAT_SCALE

#: params after one step, per storage dtype: one rounding of the stored value may
#: differ (the Triton interpreter truncates where a GPU or the CPU rounds to
#: nearest), so bf16/fp16 allow one unit in the last place, fp32 a few
PARAM_TOL: Dict[torch.dtype, Dict[str, float]] = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}
#: moments are fp32 whatever the param dtype
MOMENT_TOL = dict(rtol=1e-5, atol=1e-7)

#: the kernel test cases: p dtype, anchor dtype (None: anchor-free), amsgrad, lr as a 0-d tensor
CASES = [
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


def case_id(case) -> str:
    return f"p={case[0]}-a={case[1]}-amsgrad={case[2]}-lr_tensor={case[3]}"


def relative_error(got: Tensor, want: Tensor) -> float:
    """Worst elementwise difference over the largest magnitude of ``want`` (0 for empty tensors)."""
    if want.numel() == 0:
        return 0.0
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def signed_grad(p: Tensor, anchor: Optional[Tensor], sign: float, generator=None) -> Tensor:
    """A random grad, on ``p``'s device, whose c = -sum(g*(p-a)) is clearly of sign ``sign``.

    g = noise - sign * k * (p - a), with k chosen so the second term's share of c
    is three times what the noise can contribute (~||noise|| ||p - a||).
    """
    device = generator.device if generator is not None else p.device
    noise = torch.randn(p.shape, generator=generator, device=device).to(p.device)
    d = p.detach().float() - (anchor.float() if anchor is not None else 0.0)
    dd = float((d * d).sum())
    if dd == 0.0:
        return noise.to(p.dtype)
    k = 3.0 * float(noise.norm()) / dd**0.5 + 1e-3
    return (noise - sign * k * d).to(p.dtype)


def new_state(shapes: Sequence, p_dtype, a_dtype, amsgrad: bool, gen, device, eight_bit: bool = False,
              formats: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
    """A bucket's tensors (params, zero moments, anchors near the params, steps) from ``gen``, with
    the moments in ``formats`` (``spd_kernels.formats`` names; ``eight_bit``: bitsandbytes' for both)."""
    formats = formats or (("bnb8", "bnb8") if eight_bit else ("fp32", "fp32"))
    fmts = [moment_formats.FORMATS[name] for name in formats]
    shapes = [(s,) if isinstance(s, int) else tuple(s) for s in shapes]
    params = [torch.randn(s, generator=gen).to(p_dtype).to(device) for s in shapes]

    def scales(fmt):
        return [torch.zeros(num_blocks(p.numel(), fmt.block), device=device) for p in params] if fmt.block else None

    return dict(
        params=params,
        exp_avgs=[fmts[0].zeros(p, 0) for p in params],
        exp_avg_sqs=[fmts[1].zeros(p, 1) for p in params],
        exp_avg_scales=scales(fmts[0]),
        exp_avg_sq_scales=scales(fmts[1]),
        formats=tuple(formats),
        max_exp_avg_sqs=[torch.zeros(s, device=device) for s in shapes] if amsgrad else None,
        anchors=None if a_dtype is None else [
            (p.float() + 0.5 * torch.randn(p.shape, generator=gen).to(device)).to(a_dtype) for p in params
        ],
        steps=[torch.zeros((), device=device) for _ in shapes],
    )


def clone_state(state):
    return {key: value if value is None or key == "formats" else [t.clone() for t in value]
            for key, value in state.items()}


def bucket_of(state, grads, **settings) -> Bucket:
    """A bucket of ``state``'s tensors with ``grads``; ``settings`` are ``Hyperparameters`` fields."""
    return Bucket(grads=grads, **state, hp=Hyperparameters(**settings))


def check_step(got_state, got_stats, want_state, want_stats, grads, lam) -> None:
    """Assert one step of a backend equals the reference's, within the tables above."""
    for i, (p, q) in enumerate(zip(got_state["params"], want_state["params"])):
        # s = lam * r carries the sums' rounding times lam into p: scale the absolute slack with lam
        tol = dict(PARAM_TOL[p.dtype])
        tol["atol"] *= max(1.0, lam)
        if _coded(got_state) and p.dtype != torch.float32 and q.numel():
            # compressed moments: q itself is rounded to p's dtype before the projection, so a q on a
            # rounding tie of that dtype moves the result by one unit of q, not of the result
            tol["atol"] = max(tol["atol"], torch.finfo(p.dtype).eps * float(q.float().abs().max()))
        torch.testing.assert_close(p.float(), q.float(), **tol, msg=lambda m: f"param {i}: {m}")
    formats = got_state.get("formats") or ("fp32", "fp32")
    for key, fmt in zip(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), (*formats, "fp32")):
        if fmt != "fp32":
            check_codes(got_state, want_state, key)
        elif got_state.get(key) is not None:
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


#: compressed moments: the share of a bucket's codes that may differ from the reference's, and by
#: how much. A code differs only where the value sits within rounding of a boundary between two
#: codes (the backends round m and v in another order, a GPU fuses multiply-adds): by one code, in
#: about 1e-6 of the elements on the CPU with fp32 grads, 2e-4 on an H200 with bf16 grads
#: (whose squares land on the 8-bit maps' midpoints more often).
CODE_TIES = dict(share=1e-3, codes=1)

_SCALES = {"exp_avgs": "exp_avg_scales", "exp_avg_sqs": "exp_avg_sq_scales"}


def _coded(state) -> bool:
    return (state.get("formats") or ("fp32", "fp32")) != ("fp32", "fp32")


def _ordinal(codes: Tensor) -> Tensor:
    """Codes as integers that count up with their value (a float code's bits, sign folded)."""
    if codes.dtype == torch.uint8:
        return codes.int()
    bits = codes.view(torch.int16 if codes.element_size() == 2 else torch.int8).int()
    magnitude = bits & (0x7FFF if codes.element_size() == 2 else 0x7F)
    return torch.where(bits < 0, -magnitude, magnitude)


def check_codes(got_state, want_state, codes_key: str = None) -> None:
    """Compressed moments: per-block scales within fp32 rounding, codes equal but for ties
    (``CODE_TIES``); ``codes_key`` picks one moment (default: both)."""
    for key in [codes_key] if codes_key else list(_SCALES):
        scale_key = _SCALES[key]
        for i, (x, y) in enumerate(zip(got_state.get(scale_key) or [], want_state.get(scale_key) or [])):
            torch.testing.assert_close(x, y, **MOMENT_TOL, msg=lambda m: f"{scale_key}[{i}]: {m}")
        differ = total = 0
        for i, (x, y) in enumerate(zip(got_state[key], want_state[key])):
            assert x.dtype == y.dtype, f"{key}[{i}]: {x.dtype} codes, the reference's are {y.dtype}"
            diff = (_ordinal(x) - _ordinal(y)).abs()
            if x.dtype == torch.bfloat16:
                # bf16 codes are values: a value within MOMENT_TOL of the reference's (a fused
                # multiply-add leaves m = 1e-9 where the reference's rounding leaves 0) is a match
                near = (x.float() - y.float()).abs() <= MOMENT_TOL["atol"] + MOMENT_TOL["rtol"] * y.float().abs()
                diff = torch.where(near, torch.zeros_like(diff), diff)
            if x.numel():
                assert int(diff.max()) <= CODE_TIES["codes"], f"{key}[{i}]: codes {int(diff.max())} apart"
            differ += int((diff > 0).sum())
            total += x.numel()
        assert differ <= CODE_TIES["share"] * total, f"{key}: {differ} of {total} codes differ"


def run_step_parity(step_fn: Callable[[Bucket], Tensor], shapes, case, device, steps=10, lam=1.5,
                    max_scale=float("inf"), seed=0, eight_bit=False, formats=None) -> None:
    """``steps`` steps of ``step_fn(bucket) -> stats`` against the reference; both branches must occur.

    Each step starts both from the same state (the backend's), so this checks one
    step's function at every step count, without drift.
    """
    device = torch.device(device)
    p_dtype, a_dtype, amsgrad, lr_tensor = case
    # a seed stable across processes (str hashes are salted per process)
    seed = zlib.crc32(repr((case, seed)).encode())
    gen = torch.Generator().manual_seed(seed)
    # grads are drawn where the params live (on a GPU, realistic sizes would be slow to draw on the host)
    grad_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    state = new_state(shapes, p_dtype, a_dtype, amsgrad, gen, device, eight_bit, formats)
    lr = torch.tensor(0.02, device=device) if lr_tensor else 0.02
    hp = Hyperparameters(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=lam, amsgrad=amsgrad,
                         max_scale=max_scale)
    fired = not_fired = r_positive = 0
    nonempty = [i for i, p in enumerate(state["params"]) if p.numel() > 0]
    for _ in range(steps):
        anchors = state["anchors"] or [None] * len(shapes)
        signs = [1.0 if torch.rand((), generator=gen) < 0.5 else -1.0 for _ in shapes]
        grads = [signed_grad(p, a, s, grad_gen) for p, a, s in zip(state["params"], anchors, signs)]
        want = clone_state(state)
        want_stats = reference_step(**want, grads=grads, hp=dataclasses.replace(hp, lr=0.02))
        got_stats = step_fn(Bucket(grads=grads, **state, hp=hp)).clone()
        check_step(state, got_stats, want, want_stats, grads, lam)
        fired += sum(bool(want_stats[i, STAT_C] < 0) for i in nonempty)
        not_fired += sum(bool(want_stats[i, STAT_C] >= 0) for i in nonempty)
        r_positive += sum(bool(want_stats[i, STAT_R] > 0) for i in nonempty)
        assert float(got_stats[:, STAT_SCALE].max()) <= max_scale
    assert fired > 5 and not_fired > 5 and r_positive > 0, (fired, not_fired, r_positive)


def _half(t: Tensor, part: int) -> Tensor:
    """The flat first or second half of ``t``, cut as ``torch.chunk`` cuts (one element: an empty half)."""
    flat = t.view(-1)
    cut = (flat.numel() + 1) // 2
    return flat[:cut] if part == 0 else flat[cut:]


def two_shard_step(start_fn: Callable[[Bucket], Callable[[], Tensor]]) -> Callable[[Bucket], Tensor]:
    """A step function ``fn(bucket) -> stats`` that runs the split step ``start_fn``
    (``spd_kernels.backends.start``'s kind) on two halves of every tensor of the
    bucket, adding the halves' sums where FSDP2 would all-reduce them."""

    def step(bucket: Bucket) -> Tensor:
        if bucket.coded:
            # halving a scale list would not give each half its own blocks, nor would the halves know
            # where they start; sharded compressed states are tested in tests/test_distributed.py
            raise ValueError("two_shard_step: 8-bit and other compressed states are not emulated; blocks and "
                             "rounding bits are local to a shard, so each half would need its own")
        shards = []
        for part in (0, 1):
            lists = {key: None if value is None else [_half(t, part) for t in value]
                     for key, value in bucket.tensor_lists().items() if key != "steps"}
            steps = bucket.steps if part == 0 else [s.clone() for s in bucket.steps]
            # NaN: whatever the backend does not overwrite shows up in the result
            sums = torch.full((len(bucket), 3), float("nan"), dtype=torch.float64, device=bucket.device)
            shards.append(Bucket(**lists, steps=steps, sums=sums, hp=bucket.hp))
        finishes = [start_fn(shard) for shard in shards]
        total = shards[0].sums + shards[1].sums
        for shard in shards:
            shard.sums.copy_(total)
        stats = [finish() for finish in finishes]
        if not torch.equal(stats[0], stats[1]):
            raise AssertionError("the two shards of a tensor disagree on its stats")
        if any(not torch.equal(a, b) for a, b in zip(shards[0].steps, shards[1].steps)):
            raise AssertionError("the two shards of a tensor disagree on its step count")
        return stats[0]

    return step

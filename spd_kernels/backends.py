"""Backend registry: which function runs a bucket, and which one ``'auto'`` picks.

Each backend is ``fn(bucket) -> stats`` for a whole step, and
``start(bucket) -> finish`` for a split step around an all-reduce of
``bucket.sums`` (see ``spd_kernels.bucket``). The optimizer only ever talks to
this module, never to a kernel directly.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List

import torch
from torch import Tensor

from .bucket import Bucket
from .reference import adam_q_, reference_step, spd_finalize, spd_project_, spd_sums

IMPLS = ("auto", "reference", "triton", "cpu")

#: storage dtypes the fused kernels take for params and anchors (math is fp32)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: functions that run outside torch.compile graphs: (wrapper, function, reason)
_EAGER_ONLY: List[tuple] = []
_DISABLED: Dict[Callable, Callable] = {}


def eager_only(reason: str):
    """Run the decorated function outside any torch.compile graph; Dynamo shows
    ``reason`` at the graph break (and ``fullgraph=True`` raises it).

    ``torch.compiler.disable`` imports Dynamo, which imports triton: at ``import
    spd_kernels`` that would come before a command line has set
    ``TRITON_INTERPRET``. So the disabled versions are made by
    ``make_eager_only()``, which ``AdamSPD()`` calls, before any step is traced.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            disabled = _DISABLED.get(call)
            return disabled(*args, **kwargs) if disabled is not None else fn(*args, **kwargs)

        _EAGER_ONLY.append((call, fn, reason))
        return call

    return wrap


def make_eager_only() -> None:
    """Build the ``torch.compiler.disable`` versions of the ``eager_only`` functions (once)."""
    for call, fn, reason in _EAGER_ONLY:
        if call not in _DISABLED:
            try:
                _DISABLED[call] = torch.compiler.disable(fn, reason=reason)
            except TypeError:  # a torch whose disable() takes no reason
                _DISABLED[call] = torch.compiler.disable(fn)


@eager_only(reason=(
    "AdamSPD: the reference backend branches on each tensor's c < 0 on the host and cannot be traced; "
    "a compiled step needs impl='cpu' or impl='triton' (fp32/bf16/fp16 contiguous params), "
    "or compile without fullgraph=True and the reference runs eagerly"
))
def run_reference(bucket: Bucket) -> Tensor:
    if bucket.skipped():
        return bucket.last_stats()
    return reference_step(
        bucket.params,
        bucket.grads,
        bucket.exp_avgs,
        bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs,
        bucket.anchors,
        bucket.steps,
        lr=bucket.lr,
        beta1=bucket.beta1,
        beta2=bucket.beta2,
        eps=bucket.eps,
        weight_decay=bucket.weight_decay,
        amsgrad=bucket.amsgrad,
        max_scale=bucket.max_scale,
        grad_scale=bucket.grad_scale,
    )


def start_reference(bucket: Bucket) -> Callable[[], Tensor]:
    """Split step on the reference: the Adam half now, the projection in ``finish``."""
    if bucket.skipped():
        bucket.sums.zero_()  # still joins the all-reduce: the other ranks skip too
        return bucket.last_stats
    lr = float(bucket.lr.item()) if isinstance(bucket.lr, Tensor) else bucket.lr
    qs: List[Tensor] = []
    for i, param in enumerate(bucket.params):
        p, g, q = adam_q_(
            param, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i],
            bucket.max_exp_avg_sqs[i] if bucket.amsgrad else None, bucket.steps[i],
            lr=lr, beta1=bucket.beta1, beta2=bucket.beta2, eps=bucket.eps, amsgrad=bucket.amsgrad,
            grad_scale=bucket.grad_scale,
        )
        bucket.sums[i] = spd_sums(p, g, q, bucket.anchors[i] if bucket.anchors is not None else None)
        qs.append(q)

    def finish() -> Tensor:
        rows = []
        for i, (param, q) in enumerate(zip(bucket.params, qs)):
            row = spd_finalize(bucket.sums[i], bucket.weight_decay, bucket.max_scale)
            spd_project_(param, q, bucket.anchors[i] if bucket.anchors is not None else None, row)
            rows.append(row.float())
        return torch.stack(rows)

    return finish


def run_triton(bucket: Bucket) -> Tensor:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the launcher's pointer tables: the compiled graph calls an opaque op
        from .ops.triton_custom_op import run_bucket

        return run_bucket(bucket)
    from .ops.adam_spd import adam_spd_triton_step

    return adam_spd_triton_step(bucket)


def run_cpu(bucket: Bucket) -> Tensor:
    from ._cpu import adam_spd_cpu_step

    return adam_spd_cpu_step(bucket)


def start_triton(bucket: Bucket) -> Callable[[], Tensor]:
    from .ops.adam_spd import adam_spd_triton_partials

    return adam_spd_triton_partials(bucket)


def start_cpu(bucket: Bucket) -> Callable[[], Tensor]:
    from ._cpu import adam_spd_cpu_partials

    return adam_spd_cpu_partials(bucket)


_STARTERS: Dict[str, Callable[[Bucket], Callable[[], Tensor]]] = {
    "reference": start_reference,
    "triton": start_triton,
    "cpu": start_cpu,
}

_RUNNERS: Dict[str, Callable[[Bucket], Tensor]] = {
    "reference": run_reference,
    "triton": run_triton,
    "cpu": run_cpu,
}


def cpu_kernel_error() -> str:
    """Why the compiled CPU kernel cannot be used here, or ''."""
    from . import _cpu

    return _cpu.load_error()


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str:
    """Why Triton cannot be used here, or '' when it can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # any import failure means "not available"
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    if triton_import_error():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_on()


def device_error(impl: str, device: torch.device) -> str:
    """Why backend ``impl`` cannot run tensors on ``device``, or ''."""
    if impl == "cpu" and device.type != "cpu":
        return f"impl='cpu' runs CPU tensors only, got a param on {device}"
    if impl == "triton" and not triton_runs_on(device):
        if device.type == "cpu":
            return (f"impl='triton' needs a CUDA device, got a param on {device} "
                    "(TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly, for testing)")
        return f"impl='triton' needs a CUDA device, got a param on {device}"
    return ""


def fused_supports(param: Tensor, anchor_dtype) -> bool:
    """Whether a fused kernel can take this parameter (dtype and layout)."""
    return (
        param.dtype in FUSED_DTYPES
        and (anchor_dtype is None or anchor_dtype in FUSED_DTYPES)
        and param.is_contiguous()
    )


def choose(impl: str, param: Tensor, anchor_dtype) -> str:
    """The backend that runs ``param`` under the optimizer's ``impl`` setting."""
    if impl != "auto":
        return impl
    if not fused_supports(param, anchor_dtype):
        return "reference"
    if param.device.type == "cuda" and triton_runs_on(param.device):
        return "triton"
    if param.device.type == "cpu":
        if not cpu_kernel_error():
            return "cpu"
        from . import _cpu

        _cpu.warn_fallback()
    return "reference"


def run(name: str, bucket: Bucket) -> Tensor:
    return _RUNNERS[name](bucket)


def start(name: str, bucket: Bucket) -> Callable[[], Tensor]:
    """The first half of a split step; call the returned ``finish`` after all-reducing ``bucket.sums``."""
    return _STARTERS[name](bucket)

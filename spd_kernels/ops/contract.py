"""The op contract, written once: each op's schema and its fake (shape) impl, side by side.

As bitsandbytes' ``_ops.py``: this module defines the ``torch.ops.spd_kernels``
ops, and each device registers a kernel for them elsewhere:

- ``adam_spd_step``, ``adam_spd_partials``, ``adam_spd_project``: the CPU kernel, in C++
  (``csrc/adam_spd_cpu.cpp``, ``TORCH_LIBRARY_IMPL(spd_kernels, CPU, m)``), loaded by
  ``spd_kernels._cpu``;
- ``adam_spd_triton_step``: the fused Triton step for a compiled ``step()``, in Python
  (``spd_kernels/ops/triton_custom_op.py``), on CUDA tensors and, under
  ``TRITON_INTERPRET=1``, on CPU ones.

The settings travel as one float list, ``hyper``, in
``spd_kernels.hyperparameters.PACKED`` order; a tensor ``lr`` is an input, so a
compiled step does not recompile when it changes. Mutated lists are marked
``(x!)``, so ``torch.compile`` records what each op writes. Every op returns
the stats rows ``[n, NUM_STATS]`` (fp32, ``spd_kernels.stats``) but
``adam_spd_partials``, which writes each tensor's three sums into ``sums``.
Importing this module defines the ops; it needs neither the C++ build nor triton.
"""
from __future__ import annotations

import torch

from ..stats import NUM_STATS

# The C++ build adds its own self-description (``hyperparameter_names``) as a fragment too.
_lib = torch.library.Library("spd_kernels", "FRAGMENT")

#: the CPU ops' compressed-moment lists: per-block scales (empty for a format without) and the 8-bit maps
#: (None unless bitsandbytes' format); ``index_offsets`` (step and partials) is where each tensor's shard
#: starts in its whole tensor (stochastic rounding's element index; empty: all 0)
_CPU_STATE = "Tensor(f!)[] exp_avg_scales, Tensor(g!)[] exp_avg_sq_scales, Tensor? qmaps"

SCHEMAS = {
    # one whole step of a bucket of CPU tensors
    "adam_spd_step": (
        "adam_spd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        f"Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor(e!)[] steps, {_CPU_STATE}, int[] index_offsets, "
        "float[] hyper, float inv_grad_scale, Tensor? lr_tensor=None) -> Tensor"),
    # the split step's first half: Adam, and each tensor's three local sums into sums [n, 3] (fp64)
    "adam_spd_partials": (
        "adam_spd_partials(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        f"Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor(e!)[] steps, {_CPU_STATE}, int[] index_offsets, "
        "float[] hyper, float inv_grad_scale, Tensor(h!) sums, Tensor? lr_tensor=None) -> ()"),
    # its second half: the stats from the all-reduced sums, then the projection
    "adam_spd_project": (
        "adam_spd_project(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, "
        "Tensor[] anchors, Tensor[] steps, Tensor[] exp_avg_scales, Tensor[] exp_avg_sq_scales, Tensor? qmaps, "
        "Tensor sums, float[] hyper, Tensor? lr_tensor=None) -> Tensor"),
    # one fused Triton step (empty max_exp_avg_sqs: no amsgrad; empty anchors: anchor-free; empty
    # absmax lists: fp32 moments); counts are the running projection counts, updated in place
    "adam_spd_triton_step": (
        "adam_spd_triton_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor(e!)[] steps, "
        "Tensor(f!)[] exp_avg_scales, Tensor(g!)[] exp_avg_sq_scales, int[] index_offsets, Tensor(h!) counts, "
        "float[] hyper, Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf) -> Tensor"),
}

for _schema in SCHEMAS.values():
    _lib.define(_schema)


def _stats_like(params):
    return params[0].new_empty((len(params), NUM_STATS), dtype=torch.float32)


@torch.library.register_fake("spd_kernels::adam_spd_step", lib=_lib)
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, exp_avg_scales,
      exp_avg_sq_scales, qmaps, index_offsets, hyper, inv_grad_scale, lr_tensor=None):
    return _stats_like(params)


@torch.library.register_fake("spd_kernels::adam_spd_partials", lib=_lib)
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, exp_avg_scales,
      exp_avg_sq_scales, qmaps, index_offsets, hyper, inv_grad_scale, sums, lr_tensor=None):
    return None


@torch.library.register_fake("spd_kernels::adam_spd_project", lib=_lib)
def _(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, exp_avg_scales, exp_avg_sq_scales,
      qmaps, sums, hyper, lr_tensor=None):
    return _stats_like(params)


@torch.library.register_fake("spd_kernels::adam_spd_triton_step", lib=_lib)
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, exp_avg_scales, exp_avg_sq_scales,
      index_offsets, counts, hyper, lr_tensor, grad_scale, found_inf):
    return _stats_like(params)

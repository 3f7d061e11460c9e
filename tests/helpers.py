"""Test-only helpers: random parameter sets (the shared harness is spd_kernels.testing)."""
from __future__ import annotations

from typing import List, Sequence

import torch

from spd_kernels import AdamSPD
from spd_kernels.testing import signed_grad


def clone_params(params: Sequence[torch.Tensor]) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_params(shapes, dtype=torch.float32, generator=None) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def make_anchors(params, spread=0.5, generator=None) -> List[torch.Tensor]:
    """Anchors that differ from the params, so the condition has a sign from step 1."""
    return [
        (p.detach().float() + spread * torch.randn(p.shape, generator=generator)).to(p.dtype) for p in params
    ]


def set_grads(params, anchors, signs, generator=None) -> None:
    for p, a, s in zip(params, anchors, signs):
        p.grad = signed_grad(p, a, s, generator)


def anchors_of(opt: AdamSPD, params):
    return [opt.state[p].get("anchor") for p in params]

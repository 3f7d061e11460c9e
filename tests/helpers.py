"""Shared helpers: random parameter sets built away from the c = 0 tie."""
from __future__ import annotations

from typing import List, Sequence

import torch

from spd_kernels import AdamSPD


def clone_params(params: Sequence[torch.Tensor]) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_params(shapes, dtype=torch.float32, generator=None) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def make_anchors(params, spread=0.5, generator=None) -> List[torch.Tensor]:
    """Anchors that differ from the params, so the condition has a sign from step 1."""
    return [
        (p.detach().float() + spread * torch.randn(p.shape, generator=generator)).to(p.dtype) for p in params
    ]


def signed_grad(p: torch.Tensor, anchor, sign: float, generator=None) -> torch.Tensor:
    """A random grad whose c = -sum(g*(p-a)) is clearly of sign ``sign``.

    g = noise - sign * k * (p - a) / ||p - a||^2 * ||noise||^2 ... scaled so the
    projected part dominates the noise's contribution to c by a wide margin.
    """
    noise = torch.randn(p.shape, generator=generator)
    d = p.detach().float() - (anchor.float() if anchor is not None else 0.0)
    dd = float((d * d).sum())
    if dd == 0.0:
        return noise.to(p.dtype)
    # c(noise) ~ ||noise||*||d||; add a term worth 3x that with the wanted sign
    k = 3.0 * float(noise.norm()) / dd**0.5 + 1e-3
    return (noise - sign * k * d).to(p.dtype)


def set_grads(params, anchors, signs, generator=None) -> None:
    for p, a, s in zip(params, anchors, signs):
        p.grad = signed_grad(p, a, s, generator)


def anchors_of(opt: AdamSPD, params):
    return [opt.state[p].get("anchor") for p in params]

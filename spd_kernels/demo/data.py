"""The demo's data: scikit-learn's bundled 8x8 digits, splits, augmentation and corruptions.

Everything random here draws from an explicit, seeded ``torch.Generator``: no
numpy or Python RNG, so library versions cannot move it. scikit-learn only
reads its bundled CSV (integer pixels 0..16, exact in any version); the
upsampling, augmentation and corruptions are torch ops. What can still move a
run between machines is float rounding in torch's CPU kernels, which depends on
the CPU's vector ISA and the thread count (docs/design.md, "The demo").
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

SIZE = 16  # digits are upsampled from 8x8 so that rotations and shifts stay meaningful
PRETRAIN_EXAMPLES = 900
CORRUPTIONS = ("rotate", "shift", "zoom", "noise", "blur")

Split = Tuple[torch.Tensor, torch.Tensor]  # images [n, 1, SIZE, SIZE] in [0, 1], labels [n]


def load_raw_digits() -> Split:
    """The 1797 bundled digits as integer pixels [n, 8, 8] (0..16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.int64), torch.tensor(d.target, dtype=torch.int64)


def load_digits_tensors() -> Split:
    pixels, labels = load_raw_digits()
    x = pixels.to(torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x, labels


def split_indices(labels: torch.Tensor, seed: int, shots: int):
    """Indices of the pre-training split, the few-shot set (``shots`` per class) and the held-out test set."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    pre, rest = order[:PRETRAIN_EXAMPLES], order[PRETRAIN_EXAMPLES:]
    few = torch.cat([rest[labels[rest] == c][:shots] for c in range(10)])
    test = rest[~torch.isin(rest, few)]
    return pre, few, test


def splits(x, y, seed: int, shots: int) -> Tuple[Split, Split, Split]:
    """Pre-train split, a few clean examples per class to fine-tune on, held-out test."""
    return tuple((x[i], y[i]) for i in split_indices(y, seed, shots))


def affine(x, angle, scale, dx, dy):
    """Rotate (radians), scale and shift (in [-1, 1] image units) a batch, per image."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def blur(x, sigma):
    """Gaussian blur with one sigma per image (sigma 0 leaves the image as it is)."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    s = sigma.clamp_min(1e-3).view(-1, 1)
    k1 = torch.exp(-(r.view(1, -1) ** 2) / (2 * s**2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1.unsqueeze(2) * k1.unsqueeze(1)).unsqueeze(1)  # [n, 1, 5, 5]
    return F.conv2d(x.transpose(0, 1), k2, padding=2, groups=x.shape[0]).transpose(0, 1)


def augment(x, g):
    """Pre-training augmentation: random rotation, scale, shift, blur and noise per image."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    x = affine(x, u(-0.6, 0.6), u(0.75, 1.3), u(-0.3, 0.3), u(-0.3, 0.3))
    x = blur(x, u(0.0, 1.3))
    return x + u(0.0, 0.35).view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)


def corruption_signs(n: int, g) -> torch.Tensor:
    """The direction of each image's corruption (+-1), the first draw of every corruption."""
    return torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


def corrupt(x, kind: str, g):
    n = x.shape[0]
    sign = corruption_signs(n, g)
    zero, one = torch.zeros(n), torch.ones(n)
    if kind == "rotate":
        return affine(x, sign * 0.55, one, zero, zero)
    if kind == "shift":
        return affine(x, zero, one, sign * 0.3, -sign * 0.3)
    if kind == "zoom":
        return affine(x, zero, torch.where(sign > 0, 1.3, 0.72), zero, zero)
    if kind == "noise":
        return x + 0.35 * torch.randn(x.shape, generator=g)
    if kind == "blur":
        return blur(x, torch.full((n,), 1.3))
    raise ValueError(kind)


def corrupted_test_sets(test: Split, seed: int) -> List[Split]:
    """The OOD sets of one seed, drawn once: every method is measured on the same corrupted images."""
    x, y = test
    g = torch.Generator().manual_seed(1000 + seed)
    return [(corrupt(x, kind, g), y) for kind in CORRUPTIONS]

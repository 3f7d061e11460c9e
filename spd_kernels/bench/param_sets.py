"""Parameter-shape sets for the realistic-size checks and the benchmarks (docs/design.md, "Measuring")."""
from __future__ import annotations

from typing import List, Tuple

Shape = Tuple[int, ...]


def vit_b() -> List[Shape]:
    """ViT-B/16: ~86M params in ~150 tensors."""
    d, mlp, tokens = 768, 3072, 197
    shapes: List[Shape] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, tokens, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


def llama_like(layers: int = 4, vocab: int = 32000) -> List[Shape]:
    """A few very large tensors: a 1B-style width (2048) with `layers` blocks, untied head."""
    d, ffn = 2048, 5632
    shapes: List[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    shapes += [(d,), (vocab, d)]
    return shapes


def many_small(count: int = 2000, size: int = 4096) -> List[Shape]:
    return [(size,)] * count


def lora(layers: int = 24, width: int = 1024, rank: int = 16) -> List[Shape]:
    """Rank-16 adapter factors on q, k, v, o of each layer (anchor-free)."""
    return [(rank, width), (width, rank)] * (4 * layers)


#: every named set, in the order reports list them
NAMES = ("vit_b", "llama_like", "many_small", "lora")


def get(name: str) -> List[Shape]:
    sets = {"vit_b": vit_b, "llama_like": llama_like, "many_small": many_small, "lora": lora}
    if name not in sets:
        raise ValueError(f"unknown parameter set {name!r}; choose from {', '.join(NAMES)}")
    return sets[name]()


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def transformer(total: int) -> List[Shape]:
    """A transformer-shaped set of about ``total`` params: blocks of qkv, out, MLP (4x) and
    their biases and norms, width growing with size (d = 64 * layers, as GPT-style models)."""
    d = max(64, int(round((total * 64 / 12) ** (1 / 3) / 64)) * 64)
    layers = max(1, round(total / (12 * d * d)))
    shapes: List[Shape] = []
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


def split(total: int, count: int) -> List[Shape]:
    """``total`` params as ``count`` equal 1-d tensors (the fragmentation sweep)."""
    return [(max(1, total // count),)] * count

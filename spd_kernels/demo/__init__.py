"""Robust fine-tuning in miniature: OOD accuracy at matched ID accuracy, SPD against its peers.

The protocol of the paper, shrunk to scikit-learn's bundled 8x8 digits (no
download): pre-train a small CNN on one split with strong augmentation
(rotation, scale, shift, blur, noise), keep its head, fine-tune on a few clean
examples per class, then measure in-distribution accuracy on clean held-out
digits (ID) and out-of-distribution accuracy on corrupted copies of them (OOD:
mean over rotation, shift, zoom, noise and blur). Robust fine-tuning trades ID
for OOD, so each method is swept along its own knob into a frontier (AdamW:
weight decay and steps; WiSE-FT: alpha; LP-FT: steps after the probe; L2-SP:
alpha; AdamSPD: lambda) and the methods are compared by the OOD they keep at
the same ID gain, paired by seed against AdamW.

Modules: ``data`` (digits, splits, corruptions), ``model`` (the CNN,
pre-training, evaluation), ``methods`` (the sweeps), ``frontier`` (OOD at
matched ID), ``report`` (table, PNG, JSON), ``cli`` (the command).
"""
from .cli import build_parser, main, run

__all__ = ["build_parser", "main", "run"]

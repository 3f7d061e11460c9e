"""Lightning's ``configure_optimizers`` returning AdamSPD, on one device (DDP: tests/test_stacks_distributed.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorch_lightning")

from spd_kernels import AdamSPD  # noqa: E402

from . import distributed_scenarios as sc  # noqa: E402
from .stack_runs import STEPS, _train_plain, lightning_fit  # noqa: E402


def test_lightning_single_device_equals_a_plain_loop():
    module, opt = lightning_fit(1, "auto")
    assert isinstance(opt, AdamSPD)
    model = sc.make_model()
    plain = sc.make_optimizer(model, sc.pretrained_anchors(model), "auto")
    _train_plain(model, plain, STEPS)
    got, want = sc.snapshot(module.net, opt), sc.snapshot(model, plain)
    assert want.keys() == got.keys() and any(k.startswith("anchor/") for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert sum(int(s["projections"]) for s in opt.spd_stats().values()) > 0

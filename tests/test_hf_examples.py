"""The Hugging Face examples run, and their loss falls (Trainer with AdamSPD; PEFT LoRA)."""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def test_trainer_example_builds_adamspd_from_the_factory():
    import hf_trainer

    losses, optimizer = hf_trainer.main(max_steps=60)
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    # the Trainer's own scheduler drove the lr down to (almost) zero through AdamSPD's param groups
    assert optimizer.param_groups[0]["lr"] < 1e-4
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1.0, 0.0]  # lambda as given, head plain
    assert "anchor" not in optimizer.state[next(p for n, p in hf_trainer_last_head(optimizer))]


def hf_trainer_last_head(optimizer):
    return [(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])
            if n.startswith("classifier.")]


def test_peft_lora_anchor_free():
    import peft_lora

    losses, optimizer = peft_lora.main(steps=80)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first
    assert optimizer.param_groups[0]["anchor_free"]
    assert all("anchor" not in optimizer.state[p] for p in optimizer.param_groups[0]["params"])

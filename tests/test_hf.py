"""The Hugging Face Trainer route: ``spd_kernels.hf.optimizer_cls_and_kwargs`` (single process).

DDP through the Trainer and the Trainer's FSDP2 preparation run in
tests/test_stacks_distributed.py.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from spd_kernels import AdamSPD  # noqa: E402
from spd_kernels.hf import AdamSPDFactory, adamspd_of, optimizer_cls_and_kwargs  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def _trainer(optimizer_cls_and_kwargs, steps=6, seed=0, **args):
    from _synthetic import ContainsTokenDataset, tiny_bert_config
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config())
    out = tempfile.mkdtemp()
    targs = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, report_to="none",
                              save_strategy="no", use_cpu=True, seed=seed, logging_steps=1, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=ContainsTokenDataset(n=128),
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
    return trainer, model


def test_the_factory_gives_named_groups_lambda_on_every_pretrained_weight_and_options_through():
    trainer, model = _trainer(optimizer_cls_and_kwargs(
        lr=1e-3, weight_decay=1.5, new=("classifier.",), anchor_dtype=torch.bfloat16, optim_bits=8,
        min_8bit_size=1024), weight_decay=0.01)  # the Trainer's own weight_decay must not reach SPD
    trainer.train()
    opt = adamspd_of(trainer.optimizer)
    assert isinstance(opt, AdamSPD)
    pretrained, new = opt.param_groups
    assert pretrained["weight_decay"] == 1.5 and not pretrained["anchor_free"]
    assert new["weight_decay"] == 0.0 and new["param_names"] == ["classifier.weight", "classifier.bias"]
    names = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    assert pretrained["param_names"] == names  # every pre-trained weight, biases and norms included
    stats = opt.spd_stats()
    assert set(stats) == set(names) | {"classifier.weight", "classifier.bias"}
    assert sum(int(stats[n]["projections"]) for n in names) > 0  # SPD acted
    word_embeddings = dict(model.named_parameters())["bert.embeddings.word_embeddings.weight"]
    state = opt.state[word_embeddings]
    assert state["anchor"].dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.uint8  # options passed
    assert "anchor" not in opt.state[dict(model.named_parameters())["classifier.weight"]]


def test_the_class_route_warns_that_the_trainer_overrides_lambda():
    trainer, _ = _trainer((AdamSPD, {"lr": 1e-3, "weight_decay": 1.0}), steps=1)
    with pytest.warns(UserWarning, match=r"every param group sets its own weight_decay \(\[0\.0, 0\.0\]\)"):
        trainer.create_optimizer()
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.0, 0.0]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"weight_decay": 1.0}, TypeError, "lr is required"),
    ({"lr": 1e-3, "weight_decya": 1.0}, TypeError, "unknown AdamSPD argument(s) ['weight_decya']"),
    ({"lr": 1e-3, "new_policy": "frozen"}, ValueError, "new_policy must be one of ('plain', 'anchor_free')"),
    ({"lr": 1e-3, "new": "head."}, TypeError, "new must be a list of name fragments, got the string 'head.'"),
    ({"lr": -1.0}, ValueError, "AdamSPD: lr must be >= 0, got -1.0"),
    ({"lr": 1e-3, "optim_bits": 4}, ValueError, "optim_bits must be 32 or 8, got 4"),
])
def test_bad_arguments_fail_before_training_with_named_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        optimizer_cls_and_kwargs(**kwargs)


def test_the_factory_is_what_transformers_calls_a_factory():
    from transformers.trainer_optimizer import is_optimizer_factory

    cls, kwargs = optimizer_cls_and_kwargs(lr=1e-3, weight_decay=1.0, new_policy="anchor_free")
    assert cls is AdamSPDFactory and is_optimizer_factory(cls)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model.register_parameter("lora_A", torch.nn.Parameter(torch.randn(2, 3)))
    opt = cls()(model, **kwargs)
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "0.bias"], ["lora_A"]]
    assert opt.param_groups[1]["anchor_free"] and opt.param_groups[1]["weight_decay"] == 1.0

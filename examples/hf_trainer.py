"""AdamSPD inside a Hugging Face ``Trainer``: ``Trainer(optimizers=(AdamSPD(...), scheduler))``.

A tiny BERT built from a config (no hub download) stands in for a pre-trained
model; its classifier head is new, so it gets no SPD (see
``fine_tuning_param_groups``). Run: ``python examples/hf_trainer.py``.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from spd_kernels import AdamSPD, fine_tuning_param_groups  # noqa: E402


def main(max_steps: int = 60, seed: int = 0):
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments, get_linear_schedule_with_warmup

    from _synthetic import ContainsTokenDataset, tiny_bert_config

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config())
    optimizer = AdamSPD(fine_tuning_param_groups(model, new=("classifier.",)), lr=3e-3, weight_decay=1.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=max_steps)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=max_steps, per_device_train_batch_size=32, logging_steps=10,
            report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=ContainsTokenDataset(),
                          optimizers=(optimizer, scheduler))
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    fired = sum(int(s["projections"]) for s in optimizer.spd_stats().values())
    print(f"losses every 10 steps: {[round(v, 4) for v in losses]}; projections fired: {fired}")
    return losses, optimizer


if __name__ == "__main__":
    main()

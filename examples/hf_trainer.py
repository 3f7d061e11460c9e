"""AdamSPD inside a Hugging Face ``Trainer``, through ``spd_kernels.hf.optimizer_cls_and_kwargs``.

A tiny BERT built from a config (no hub download) stands in for a pre-trained
model; its classifier head is new, so it gets no SPD (``new=("classifier.",)``,
as ``fine_tuning_param_groups`` does). The Trainer builds the optimizer from the
factory, with parameter names and SPD's lambda on every pre-trained weight, and
its own linear schedule with warmup. ``SPDStatsCallback`` logs SPD's projection
fraction, mean ratio r and per-layer deviation ||p - a|| at every logging step
through the Trainer's own loggers. The same arguments work under DDP and FSDP2
(``torchrun ... examples/hf_trainer.py``). Run: ``python examples/hf_trainer.py``.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from spd_kernels.callbacks import SPDStatsCallback  # noqa: E402
from spd_kernels.hf import adamspd_of, optimizer_cls_and_kwargs  # noqa: E402


def main(max_steps: int = 60, seed: int = 0):
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    from _synthetic import ContainsTokenDataset, tiny_bert_config

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config())
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=max_steps, per_device_train_batch_size=32, logging_steps=10,
            warmup_steps=5, lr_scheduler_type="linear", report_to="none", save_strategy="no",
            use_cpu=not torch.cuda.is_available(), seed=seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=ContainsTokenDataset(),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(lr=3e-3, weight_decay=1.0,
                                                                            new=("classifier.",)))
        trainer.add_callback(SPDStatsCallback(trainer))
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    spd = [e for e in trainer.state.log_history if "spd/projected_fraction" in e]
    print(f"losses every 10 steps: {[round(v, 4) for v in losses]}")
    print("SPD every 10 steps: projected fraction", [round(e["spd/projected_fraction"], 3) for e in spd],
          "mean r", [round(e["spd/r_mean"], 3) for e in spd], "deviation", [round(e["spd/deviation"], 3) for e in spd])
    return losses, adamspd_of(trainer.optimizer)


if __name__ == "__main__":
    main()

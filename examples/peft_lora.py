"""AdamSPD with PEFT LoRA: the base model frozen, LoRA factors trained anchor-free.

LoRA factors start at (random A, zero B): there is no pre-trained value to
anchor them to, so their group is anchor-free (a = 0, ``pre: None``). A tiny
BERT built from a config (no hub download). Run: ``python examples/peft_lora.py``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from spd_kernels import AdamSPD, fine_tuning_param_groups  # noqa: E402


def main(steps: int = 80, seed: int = 0, device: str | None = None):
    """Train the LoRA factors (and the new head) on CUDA when there is a GPU, else on the CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from _synthetic import ContainsTokenDataset, tiny_bert_config

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"])).to(device)
    groups = fine_tuning_param_groups(model, new=("lora_", "classifier"), new_policy="anchor_free")
    assert len(groups) == 1, "the base is frozen: only new params train"
    optimizer = AdamSPD(groups, lr=1e-2, weight_decay=0.5)
    data = ContainsTokenDataset()
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    losses, step = [], 0
    while step < steps:
        for batch in loader:
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable params: {trainable}; loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10)")
    return losses, optimizer


if __name__ == "__main__":
    main()

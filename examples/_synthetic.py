"""A small synthetic sequence-classification task: does token 7 occur in the sequence?"""
from __future__ import annotations

import torch


class ContainsTokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 512, length: int = 16, vocab: int = 50, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, vocab, (n, length), generator=g)
        has = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(0, length, (n,), generator=g)
        self.ids[has, pos[has]] = 7
        self.labels = has.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2,
    )

"""The demo's model: a small CNN (4 layers, 8 tensors), its augmented pre-training and its evaluation."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from .data import Split, augment


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def copy_of(model: SmallCNN) -> SmallCNN:
    out = SmallCNN()
    out.load_state_dict(model.state_dict())
    return out


def pretrain(x, y, seed: int, steps: int) -> SmallCNN:
    """Adam on augmented minibatches of the pre-training split; init and batches from ``seed``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def deviation(model, ref: Dict[str, torch.Tensor]) -> float:
    """||theta - theta0|| over every parameter."""
    with torch.no_grad():
        return math.sqrt(sum(float((p - ref[n]).pow(2).sum()) for n, p in model.named_parameters()))


@dataclass
class Point:
    """One model on a method's curve: its knob value, ID and OOD accuracy (%), distance from theta0."""

    knob: float
    id_acc: float
    ood_acc: float
    deviation: float


class Evaluator:
    """Measures a model of one seed: ID on the clean test set, OOD as the mean over the corrupted sets."""

    def __init__(self, test: Split, ood_sets: List[Split], pretrained: SmallCNN):
        self.test, self.ood_sets = test, ood_sets
        self.ref = {n: p.detach().clone() for n, p in pretrained.named_parameters()}

    def __call__(self, model, knob: float) -> Point:
        ood = statistics.mean(accuracy(model, x, y) for x, y in self.ood_sets)
        return Point(knob, accuracy(model, *self.test), ood, deviation(model, self.ref))

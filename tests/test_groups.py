"""fine_tuning_param_groups: SPD for pre-trained weights, nothing pulls new modules back."""
from __future__ import annotations

import pytest
import torch

from spd_kernels import AdamSPD, fine_tuning_param_groups


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(2, 8))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.frozen(self.body(x))
        return self.head(h + h @ self.lora_a.t() @ self.lora_a)


@pytest.mark.parametrize("policy", ["plain", "anchor_free"])
def test_groups_split_pretrained_and_new(policy):
    model = Backbone()
    groups = fine_tuning_param_groups(model, new=("lora_", "head."), new_policy=policy, lr=5e-2)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names == [["body.weight", "body.bias"], ["lora_a", "head.weight", "head.bias"]]
    opt = AdamSPD(groups, lr=1e-2, weight_decay=2.0)
    assert opt.param_groups[1]["anchor_free"] and opt.param_groups[1]["lr"] == 5e-2
    assert opt.param_groups[1]["weight_decay"] == (0.0 if policy == "plain" else 2.0)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert "anchor" in opt.state[model.body.weight] and "anchor" not in opt.state[model.head.weight]
    stats = opt.spd_stats()
    assert set(stats) == {"body.weight", "body.bias", "lora_a", "head.weight", "head.bias"}
    if policy == "plain":  # lambda = 0: the new params never move by projection
        assert all(float(stats[n]["scale"]) == 0.0 for n in ("lora_a", "head.weight", "head.bias"))


def test_plain_new_group_is_adam():
    torch.manual_seed(0)
    model = Backbone()
    twin = Backbone()
    twin.load_state_dict(model.state_dict())
    opt = AdamSPD(fine_tuning_param_groups(model, new=("head.",)), lr=1e-2, weight_decay=3.0)
    adam = torch.optim.Adam(twin.head.parameters(), lr=1e-2, foreach=False)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(6):
        for m, o in ((model, opt), (twin, adam)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        twin.body.weight.grad = twin.body.bias.grad = twin.lora_a.grad = None  # adam only has the head
        opt.step()
        adam.step()
        twin.body.load_state_dict(model.body.state_dict())
        with torch.no_grad():
            twin.lora_a.copy_(model.lora_a)
    for p, q in zip(model.head.parameters(), twin.head.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bad_policy():
    with pytest.raises(ValueError, match="new_policy must be one of"):
        fine_tuning_param_groups(Backbone(), new_policy="zero")

"""Hugging Face ``Trainer`` callback: SPD's per-layer stats through the Trainer's own loggers.

    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=spd_kernels.hf.optimizer_cls_and_kwargs(...))
    trainer.add_callback(SPDStatsCallback(trainer))

At each step the Trainer logs (``logging_steps``), the callback reads
``AdamSPD.spd_stats()`` once (one device-to-host copy) and hands these to
``trainer.log``, so every reporter the Trainer was given (TensorBoard, W&B,
the console, ``trainer.state.log_history``) records them at that step:

- ``spd/projected_fraction``: the share of layer-steps since the previous log
  whose SPD condition fired (c < 0), from the optimizer's running projection
  counts, so no step in between is missed or read;
- ``spd/r_mean``: the mean ratio r over the layers that fired in the last step
  (0 when none did); the applied pull of a layer is lambda * r;
- ``spd/deviation/<name>``: ||p - a|| of each layer (p before the last step)
  and ``spd/deviation``, their root sum of squares over all layers.

Only layers under SPD count (groups with ``weight_decay`` > 0). On the other
steps the callback does nothing: no read, no sync. It holds the trainer
because a ``TrainerCallback`` cannot add to the Trainer's log on its own (the
reporters run before user callbacks in ``on_log``); TRL's callbacks do the same.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from transformers import TrainerCallback

from .hf import adamspd_of


def spd_layer_names(optimizer) -> List[str]:
    """Names (as in ``spd_stats()``) of the params in groups where SPD acts (``weight_decay`` > 0)."""
    return [name for name, group, _ in optimizer.named_params() if group["weight_decay"] > 0]


class SPDStatsCallback(TrainerCallback):
    def __init__(self, trainer, prefix: str = "spd/"):
        self.trainer = trainer
        self.prefix = prefix
        self._counts: Optional[Dict[str, float]] = None  # running projection counts at the previous log
        self._step = 0  # global step of the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self._counts, self._step = None, state.global_step

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not control.should_log:
            return
        opt = adamspd_of(optimizer if optimizer is not None else self.trainer.optimizer)
        if opt is None:
            return
        logs = self.read(opt, state.global_step)
        if logs:
            self.trainer.log(logs)
            control.should_log = True  # trainer.log cleared it: the Trainer's own log of this step still comes
        return control

    def read(self, optimizer, global_step: int) -> Dict[str, float]:
        """The logged values, from one device-to-host copy of the last step's stats."""
        stats = optimizer.spd_stats()
        names = [n for n in spd_layer_names(optimizer) if n in stats]
        if not names:
            return {}
        device = stats[names[0]]["r"].device
        columns = ("projections", "projected", "r", "norm_p_a")
        table = torch.stack([torch.stack([stats[n][c].to(device, torch.float32).reshape(()) for c in columns])
                             for n in names]).tolist()  # the one sync
        rows = dict(zip(names, table))
        previous = self._counts or {}
        fired = sum(row[0] - previous.get(n, 0.0) for n, row in rows.items())
        steps = max(1, global_step - self._step)
        self._counts, self._step = {n: row[0] for n, row in rows.items()}, global_step
        firing = [row[2] for row in rows.values() if row[1]]
        p = self.prefix
        out = {f"{p}projected_fraction": fired / (len(names) * steps),
               f"{p}r_mean": sum(firing) / len(firing) if firing else 0.0,
               f"{p}deviation": sum(row[3] ** 2 for row in rows.values()) ** 0.5}
        out.update({f"{p}deviation/{n}": row[3] for n, row in rows.items()})
        return out

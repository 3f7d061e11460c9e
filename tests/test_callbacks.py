"""SPDStatsCallback: the values logged at each logging step are spd_stats()'s, read once per logging step."""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from spd_kernels import AdamSPD, fine_tuning_param_groups  # noqa: E402
from spd_kernels.callbacks import SPDStatsCallback, spd_layer_names  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from _synthetic import ContainsTokenDataset, tiny_bert_config  # noqa: E402

LOGGING_STEPS, MAX_STEPS = 4, 12


class StepRecorder(TrainerCallback):
    """Reads spd_stats() after every step (the test's own syncs) and keeps every on_log it receives."""

    def __init__(self, optimizer):
        self.optimizer, self.steps, self.logs = optimizer, {}, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = {n: {k: float(v) for k, v in s.items()}
                                         for n, s in self.optimizer.spd_stats().items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def train(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config())
    optimizer = AdamSPD(fine_tuning_param_groups(model, new=("classifier.",)), lr=3e-3, weight_decay=1.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=32,
                             logging_steps=LOGGING_STEPS, report_to="none", save_strategy="no", use_cpu=True,
                             seed=seed, disable_tqdm=True)
    recorder = StepRecorder(optimizer)
    # the recorder is registered before the SPD callback, as the Trainer's reporters are
    trainer = Trainer(model=model, args=args, train_dataset=ContainsTokenDataset(), optimizers=(optimizer, None),
                      callbacks=[recorder])
    callback = SPDStatsCallback(trainer)
    reads = []
    original_read = callback.read
    callback.read = lambda opt, step: reads.append(step) or original_read(opt, step)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, optimizer, recorder, reads


def test_logged_values_match_spd_stats_and_are_read_only_on_logging_steps(tmp_path):
    trainer, optimizer, recorder, reads = train(tmp_path)
    # one read per logging step, none in between
    assert reads == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    spd_logs = [(step, logs) for step, logs in recorder.logs if "spd/projected_fraction" in logs]
    history = [e for e in trainer.state.log_history if "spd/projected_fraction" in e]
    assert [s for s, _ in spd_logs] == [e["step"] for e in history] == reads
    # the Trainer's own log of those steps (the loss) still comes
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == reads
    names = spd_layer_names(optimizer)
    assert names and not any(n.startswith("classifier.") for n in names)  # weight_decay 0: not under SPD
    fired_total = 0.0
    previous = 0
    for step, logs in spd_logs:
        stats = recorder.steps[step]
        for n in names:
            assert logs[f"spd/deviation/{n}"] == pytest.approx(stats[n]["norm_p_a"], rel=1e-6)
        assert logs["spd/deviation"] == pytest.approx(sum(stats[n]["norm_p_a"] ** 2 for n in names) ** 0.5, rel=1e-6)
        firing = [stats[n]["r"] for n in names if stats[n]["projected"]]
        assert logs["spd/r_mean"] == pytest.approx(sum(firing) / len(firing) if firing else 0.0, rel=1e-6)
        # the window's fraction: every step since the previous log, as the recorder saw each one
        window = [recorder.steps[s][n]["projected"] for s in range(previous + 1, step + 1) for n in names]
        assert logs["spd/projected_fraction"] == pytest.approx(sum(window) / len(window), rel=1e-6)
        fired_total += sum(window)
        previous = step
    assert 0 < fired_total  # the condition fired somewhere, so the fractions were tested on nonzero counts
    assert fired_total == sum(float(optimizer.spd_stats()[n]["projections"]) for n in names)


def test_no_read_of_the_optimizer_between_logging_steps(tmp_path, monkeypatch):
    calls = []
    original = AdamSPD.spd_stats

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(AdamSPD, "spd_stats", counted)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    optimizer = AdamSPD(fine_tuning_param_groups(model, new=("classifier.",)), lr=3e-3, weight_decay=1.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=32,
                             logging_steps=LOGGING_STEPS, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ContainsTokenDataset(), optimizers=(optimizer, None))
    trainer.add_callback(SPDStatsCallback(trainer))
    trainer.train()
    assert len(calls) == MAX_STEPS // LOGGING_STEPS

"""The demo: end to end on the quick budget, identical twice, its inputs pinned, its frontier reading."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("sklearn")

from spd_kernels.demo import cli, data  # noqa: E402
from spd_kernels.demo.frontier import matched_table, ood_at_id  # noqa: E402
from spd_kernels.demo.methods import Curve, SeedResult  # noqa: E402
from spd_kernels.demo.model import Point  # noqa: E402


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def test_the_inputs_are_pinned():
    # Integer-valued, so exact on any machine and any numpy/scikit-learn version: the bundled
    # digits, each seed's split and the corruption directions (torch's seeded generator).
    pixels, labels = data.load_raw_digits()
    assert pixels.shape == (1797, 8, 8) and int(pixels.sum()) == 561_718 and int(labels.sum()) == 8_070
    assert _sha(pixels) == "51aa641716dc54df"
    pre, few, test = data.split_indices(labels, seed=0, shots=10)
    assert (len(pre), len(few), len(test)) == (900, 100, 797)
    assert _sha(torch.cat([pre, few, test])) == "002c8bd6856d9b89"
    signs = data.corruption_signs(797, torch.Generator().manual_seed(1000))
    assert _sha(signs) == "5805660ab5489a87"


def test_frontier_reads_the_best_segment_at_a_target_id():
    up = Curve("a", "steps", [Point(0, 80.0, 70.0, 0.0), Point(1, 90.0, 60.0, 1.0)])
    other = Curve("b", "steps", [Point(0, 80.0, 70.0, 0.0), Point(1, 84.0, 68.0, 0.5), Point(2, 92.0, 64.0, 1.0)])
    assert ood_at_id([up], 85.0) == pytest.approx(65.0)
    assert ood_at_id([up, other], 85.0) == pytest.approx(67.5)  # the better curve at that ID
    assert ood_at_id([up], 95.0) is None  # never reached: no value
    seeds = [SeedResult(s, Point(0, 80.0, 70.0, 0.0), {"AdamW": [up], "AdamSPD": [other]}) for s in range(3)]
    rows = {r["method"]: r for r in matched_table(seeds, levels=(0.5,))}  # theta_ft gains 10: ID 85
    level = rows["AdamSPD"]["levels"][0]
    assert level["ood"]["mean"] == pytest.approx(67.5) and level["ood"]["n"] == 3
    assert level["delta"]["mean"] == pytest.approx(2.5) and level["delta"]["std"] == 0.0


def _quick_run():
    torch.set_num_threads(cli.THREADS)
    return cli.run(2, cli.QUICK["pretrain_steps"], cli.QUICK["grid"], log=lambda s: None)


def test_two_runs_are_identical():
    first, second = _quick_run(), _quick_run()
    assert [asdict(s) for s in first] == [asdict(s) for s in second]


def test_demo_quick_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "spd_kernels", "demo", "--quick", "--formats", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "seed 1/2" in out.stdout and "OOD @ 75%" in out.stdout and "vs AdamW" in out.stdout
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["environment"]["threads"] == cli.THREADS
    assert [r["method"] for r in result["table"]] == ["pre-trained", "AdamW", "WiSE-FT", "LP-FT", "L2-SP",
                                                      "AdamSPD", "AdamSPD 8-bit", "AdamSPD bf16",
                                                      "AdamSPD fp8/bf16"]
    grid = cli.QUICK["grid"]
    for seed in result["seeds"]:
        curves = seed["curves"]
        assert [p["knob"] for p in curves["AdamW"][0]["points"]] == [0, *grid.checkpoints]
        assert [p["knob"] for p in curves["AdamSPD"][0]["points"]] == sorted(grid.spd_lambda)
        assert [p["knob"] for p in curves["WiSE-FT"][0]["points"]] == list(grid.wise_alpha)
        # WiSE-FT's ends are the pre-trained model and AdamW's final model
        pre, wise, adamw = seed["pretrained"], curves["WiSE-FT"][0]["points"], curves["AdamW"][0]["points"]
        assert (wise[0]["id_acc"], wise[0]["ood_acc"], wise[0]["deviation"]) == (pre["id_acc"], pre["ood_acc"], 0.0)
        assert wise[-1]["id_acc"] == adamw[-1]["id_acc"] and wise[-1]["ood_acc"] == adamw[-1]["ood_acc"]
        assert adamw[-1]["id_acc"] > pre["id_acc"]  # fine-tuning on the few-shot set helps ID
    # chance is 10%: the (short) pre-training learned something
    assert sum(seed["pretrained"]["id_acc"] for seed in result["seeds"]) / len(result["seeds"]) > 15.0
    recorded = result["seeds"][0]["projections"]
    assert len(recorded["layers"]) == 8 and len(recorded["fired"][0]) == grid.finetune_steps
    assert (tmp_path / "demo.png").stat().st_size > 10_000

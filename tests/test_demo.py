"""The demo end to end on a reduced budget: table shape and sanity."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def test_demo_runs_and_its_table_is_sane(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "spd_kernels", "demo", "--seeds", "2", "--pretrain-steps", "150",
         "--finetune-steps", "60", "--lambdas", "1,20", "--eight-bit", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    data = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == [
        "pre-trained (no fine-tuning)", "AdamW wd=0.01", "L2-SP a=0.1",
        "AdamSPD lambda=1", "AdamSPD lambda=20", "AdamSPD lambda=20 capped",
        "AdamSPD lambda=1 8-bit", "AdamSPD lambda=20 8-bit",
    ]
    for r in rows.values():
        assert r["seeds"] == 2
        for key in ("id", "ood"):
            assert 0.0 <= r[key][0] <= 100.0
        assert r["deviation"][0] >= 0.0
    assert rows["pre-trained (no fine-tuning)"]["deviation"][0] == 0.0
    # fine-tuning moves the weights; a strong SPD keeps them much closer to the pre-trained ones
    assert rows["AdamW wd=0.01"]["deviation"][0] > 0.0
    assert rows["AdamSPD lambda=20 capped"]["deviation"][0] <= rows["AdamW wd=0.01"]["deviation"][0]
    # chance is 10%: the pre-trained model and AdamW both learned something
    assert rows["pre-trained (no fine-tuning)"]["id"][0] > 20.0
    assert rows["AdamW wd=0.01"]["id"][0] > 20.0
    spd_runs = [r for r in data["runs"] if r["projection_freq"]]
    assert spd_runs and len(spd_runs[0]["projection_freq"]) == len(spd_runs[0]["layer_names"]) == 8
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "OOD %" in out.stdout

"""The end-to-end Trainer benchmark (bench/e2e_trainer.py) on its tiny model: every column, from one run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_bench_measures_each_optimizer_in_one_run(tmp_path):
    names = ["adamw_fused", "adamspd_fp32", "adamspd_8bit"]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "e2e_trainer.py"), "--size", "tiny", "--seq", "16",
           "--batch", "2", "--warmup", "1", "--steps", "2", "--optimizers", *names, "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["optimizer"]: r for r in data["rows"]}
    assert list(rows) == names and data["meta"]["machine"] and data["meta"]["versions"]["torch"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and 0 < r["optimizer_share"] < 1 and r["peak_bytes"] > 0
        assert r["timed_steps"] == 2
    # state bytes per param, counted from the optimizers' own tensors: AdamW's two fp32 moments; AdamSPD
    # adds an fp32 anchor; 8-bit moments with bf16 anchors (the tiny model's small tensors stay fp32)
    assert rows["adamw_fused"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert rows["adamspd_fp32"]["state_bytes_per_param"] == pytest.approx(12.0, abs=0.01)
    assert 4.0 < rows["adamspd_8bit"]["state_bytes_per_param"] < 4.2
    table = (tmp_path / "e2e.md").read_text()
    assert "| adamspd_8bit |" in table and "tokens/s" in table and data["meta"]["machine"] in table

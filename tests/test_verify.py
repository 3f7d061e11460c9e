"""`python -m spd_kernels verify` end to end, and that it catches a broken backend."""
from __future__ import annotations

import os
import subprocess
import sys

import dataclasses

import pytest
import torch

from spd_kernels import backends, verify
from spd_kernels.bench import lines
from spd_kernels.stats import STAT_SCALE


def test_verify_command_passes():
    # as from a shell: the command itself turns on the Triton interpreter when there is no GPU
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "spd_kernels", "verify", "--steps", "3"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "0 failed" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.endswith("PASS")]
    assert len(rows) >= 8  # reference and cpu (or triton), fp32 and bf16, whole and split
    split = [row for row in rows if " split " in row]
    whole_fp32 = [row for row in rows if " split " not in row and row.split()[2] == "fp32"]
    assert len(split) == len(whole_fp32)
    # every compressed format each backend declares has its row
    for name in backends.available(torch.device("cpu")):
        for pair in verify.FORMAT_SETTINGS:
            if pair != ("fp32", "fp32") and not backends.get(name).format_error(pair):
                label = "/".join(dict.fromkeys(pair))
                assert any(row.split()[:3] == [name, "float32", label] for row in rows), (name, label)


def test_verify_fails_when_a_backend_skips_the_projection(monkeypatch):
    reference = backends.get("reference")

    def no_projection(bucket):
        saved = bucket.hp
        bucket.hp = dataclasses.replace(saved, weight_decay=0.0)  # the step then never pulls toward the anchor
        try:
            stats = reference.run(bucket)
        finally:
            bucket.hp = saved
        stats[:, STAT_SCALE] = 0.0
        return stats

    monkeypatch.setitem(backends.REGISTRY, "reference", dataclasses.replace(reference, run=no_projection))
    row = verify.run_backend("reference", torch.float32, torch.device("cpu"), steps=6)
    assert row.fired > 0
    assert not row.passed and row.errors["param"] > verify.TOLERANCE[torch.float32]


def test_bench_command_writes_table_json_csv_png(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "spd_kernels", "bench", "--small", "--sets", "vit_b,lora", "--rounds", "2",
         "--warmup", "1", "--kernels-only", "--state-formats", "--fresh-grads", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    import json

    data = json.loads((tmp_path / "bench.json").read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert {"spd_reference", "adamw_fused", "adamw_foreach", "spd_compiled"} <= impls
    if "cpu" in backends.available("cpu"):  # the kernels-only lines need a fast backend
        assert {"spd", "spd_kernels", "spd_split"} <= impls
        # the state formats: bf16 anchors save 2 B/param, 8-bit moments 6 more (+ absmax), vs 12 fp32
        state = {r["impl"]: r["state_bytes_per_param"] for r in data["rows"] if r["set"] == "vit_b"}
        assert state["spd"] == pytest.approx(12.0, abs=0.01) and state["adamw_fused"] == pytest.approx(8.0, abs=0.01)
        assert state["spd_bf16a"] == pytest.approx(10.0, abs=0.01)
        assert 4.0 < state["spd_8bit"] <= 4.1
    assert data["meta"]["fresh_grads"] is True
    # fresh grads: SPD projects some tensors and not others; AdamW lines have no such column
    for r in data["rows"]:
        if r["set"] == "vit_b" and r["impl"] in ("spd", "spd_bf16a", "spd_8bit", "spd_reference"):
            assert 0 < r["projected_pct"] < 100, r
            # the projection pass's bytes: p read and written, the anchor read, for that share
            anchor = lines.LINES[r["impl"]].anchor_bytes
            assert r["gbs_with_projection"] == pytest.approx(r["gbs"] * (1 + r["projected_pct"] / 100 * (8 + anchor) /
                                                                         lines.LINES[r["impl"]].step_bytes(True)))
        if r["impl"].startswith("adamw"):
            assert r["projected_pct"] is None and r["gbs_with_projection"] is None
        # the byte floor: the line's bytes, its projection share included, over AdamW fused's
        anchored = r["set"] == "vit_b"
        line, fused = lines.LINES[r["impl"]], lines.LINES["adamw_fused"].step_bytes(anchored)
        if line.projects and r["projected_pct"] is None:  # an SPD step's projections not counted: no floor
            assert r["bytes_vs_adamw_fused"] is None, r
            continue
        share = (r["projected_pct"] or 0.0) / 100
        want = (line.step_bytes(anchored) + share * line.projection_bytes(anchored)) / fused
        assert r["bytes_vs_adamw_fused"] == pytest.approx(want), r
    assert next(r for r in data["rows"] if r["impl"] == "adamw_fused")["bytes_vs_adamw_fused"] == 1.0
    assert {r["set"] for r in data["rows"]} == {"vit_b", "lora"}
    for r in data["rows"]:
        assert r["ms"] > 0 and r["gbs"] > 0
    assert data["meta"]["bandwidth_gbs"] > 0
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(data["rows"]) + 1
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "vs fused" in out.stdout


def test_verify_on_a_parameter_set_takes_both_branches():
    impl = "cpu" if "cpu" in backends.available("cpu") else "reference"
    row = verify.run_backend(impl, torch.float32, torch.device("cpu"), steps=3, param_set="lora")
    assert row.passed, row
    assert 0 < row.fired < row.total


def test_importing_the_package_leaves_triton_unimported():
    # the command line sets TRITON_INTERPRET after `import spd_kernels`: triton must not be imported by then
    code = "import sys, spd_kernels; assert 'triton' not in sys.modules and 'torch._dynamo' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_verify_split_row_fails_when_the_sums_are_not_combined(monkeypatch):
    # a split step that finishes from its own shard's sums alone must not pass
    reference = backends.get("reference")

    def local_only(bucket):
        finish = reference.start(bucket)
        local = bucket.sums.clone()

        def finish_local():
            bucket.sums.copy_(local)
            return finish()

        return finish_local

    monkeypatch.setitem(backends.REGISTRY, "reference", dataclasses.replace(reference, start=local_only))
    row = verify.run_split("reference", torch.float32, torch.device("cpu"), steps=6)
    assert not row.passed and row.errors["param"] > verify.TOLERANCE[torch.float32]

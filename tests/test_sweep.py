"""``bench --sweep``: a tiny sweep end to end (files, columns, points); no timing assertions."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from spd_kernels.bench import lines as bench_lines
from spd_kernels.bench import measure, report, sweep

COLUMNS = {"sweep", "x", "impl", "tensors", "params_m", "ms", "vs_adamw_fused", "gbs", "pct_bandwidth",
           "peak_extra_mb", "state_bytes_per_param"}


@pytest.mark.parametrize("kind", ["size", "count"])
def test_a_tiny_sweep_writes_its_table_json_csv_and_png(kind, tmp_path, monkeypatch, capsys):
    # two tiny points instead of the real ones, one round: what is checked is the plumbing
    _tiny_points(monkeypatch)
    monkeypatch.setattr(sweep, "count_points", lambda small: [2, 8])
    monkeypatch.setattr(sweep, "count_total", lambda small, n, free: 20_000)
    lines = ("spd", "spd_8bit", "adamw_fused", "spd_reference")
    assert sweep.main(kind, torch.device("cpu"), small=True, rounds=1, warmup=1, out_dir=str(tmp_path),
                      lines=lines) == 0
    data = json.loads((tmp_path / f"sweep-{kind}.json").read_text())
    rows = data["rows"]
    assert data["meta"]["sweep"] == kind and data["meta"]["small"] is True and data["meta"]["bandwidth_gbs"] > 0
    assert data["meta"]["complete"] is True and data["meta"]["left_out"] == []
    assert all(COLUMNS <= set(r) for r in rows)
    want_x = [20_000, 80_000] if kind == "size" else [2, 8]
    assert sorted({r["x"] for r in rows}) == want_x
    ran = set(bench_lines.available(torch.device("cpu"), lines))
    for x in want_x:
        assert {r["impl"] for r in rows if r["x"] == x} == ran  # every line at every point
    for r in rows:
        assert r["ms"] > 0 and r["gbs"] > 0 and r["pct_bandwidth"] > 0
        assert r["vs_adamw_fused"] == pytest.approx(1.0) if r["impl"] == "adamw_fused" else r["vs_adamw_fused"] > 0
    if kind == "count":
        assert [r["tensors"] for r in rows if r["impl"] == "adamw_fused"] == [2, 8]
    with open(tmp_path / f"sweep-{kind}.csv") as f:
        assert COLUMNS <= set(next(csv.reader(f)))
    assert (tmp_path / f"sweep-{kind}.png").stat().st_size > 10_000
    assert "vs fused" in capsys.readouterr().out


def _tiny_points(monkeypatch):
    monkeypatch.setattr(sweep, "size_points", lambda device, small, n, free: [20_000, 80_000])


def test_a_sweep_keeps_what_it_measured_when_a_later_point_fails(tmp_path, monkeypatch):
    # the outputs are rewritten after every point: a run cut short keeps its finished points
    _tiny_points(monkeypatch)
    real = report.bench_set

    def fail_at_the_second_point(name, *args, **kwargs):
        if name == "size=80000":
            raise MemoryError("pretend the large point does not fit")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(report, "bench_set", fail_at_the_second_point)
    with pytest.raises(MemoryError):
        sweep.main("size", torch.device("cpu"), small=True, rounds=1, warmup=1, out_dir=str(tmp_path),
                   lines=("spd", "adamw_fused"))
    data = json.loads((tmp_path / "sweep-size.json").read_text())
    assert {r["x"] for r in data["rows"]} == {20_000} and data["meta"]["complete"] is False
    assert (tmp_path / "sweep-size.png").exists() and (tmp_path / "sweep-size.csv").exists()


def test_a_spent_time_budget_starts_no_new_point(tmp_path, monkeypatch, capsys):
    _tiny_points(monkeypatch)
    assert sweep.main("size", torch.device("cpu"), small=True, rounds=1, warmup=1, out_dir=str(tmp_path),
                      lines=("spd", "adamw_fused"), budget_s=0.0) == 0
    data = json.loads((tmp_path / "sweep-size.json").read_text())
    assert {r["x"] for r in data["rows"]} == {20_000}  # the first point always runs
    assert data["meta"]["left_out"] == [80_000] and data["meta"]["complete"] is False
    assert "points [80000] left out" in capsys.readouterr().out
    args = report.build_parser().parse_args(["--sweep", "size", "--budget-s", "90"])
    assert args.budget_s == 90.0


def test_sweep_points_fit_memory_and_the_small_flag():
    cpu = torch.device("cpu")
    free = measure.free_memory(cpu)
    small = sweep.size_points(cpu, small=True, n_lines=7, free=free)
    assert sweep.size_points(cpu, small=False, n_lines=7, free=free)[-1] <= 300_000_000
    assert small and small[0] == 1_000_000 and small[-1] <= 16_000_000
    assert all(b == 4 * a for a, b in zip(small, small[1:]))
    assert sweep.count_points(True)[-1] < sweep.count_points(False)[-1] == 20_000
    assert 0 < sweep.count_total(small=True, n_lines=7, free=free) <= 8_000_000
    # the points follow the memory given: 24 GB reaches 256M params (core lines), 8 GB stops at 64M
    assert sweep.size_points(cpu, small=False, n_lines=7, free=24 * 2**30)[-1] == 256_000_000
    assert sweep.size_points(cpu, small=False, n_lines=7, free=8 * 2**30)[-1] == 64_000_000
    assert sweep.count_total(small=False, n_lines=7, free=24 * 2**30) == 64_000_000


def test_bench_parser_offers_the_sweeps():
    args = report.build_parser().parse_args(["--sweep", "count", "--small"])
    assert args.sweep == "count" and args.small
    with pytest.raises(SystemExit):
        report.build_parser().parse_args(["--sweep", "depth"])


def test_cpu_free_memory_counts_reclaimable_cache():
    # MemAvailable (free pages plus the cache the kernel gives back) is at least the free
    # page count and at most the machine's memory, so the sweep's sizes do not move with
    # whatever files were read last
    free = measure.free_memory(torch.device("cpu"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") * 0.9 <= free <= total

"""bench/cpu_block_costs.py compiles the CPU kernel's own source with its timing harness: it must
keep building and report every part (its figures back the README's reading of the 8-bit step)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_block_cost_tool_builds_and_times_every_part(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))  # a fresh build, not a cached one
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_block_costs.py"), "--elements", "1024",
                          "--reps", "3", "--rounds", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    costs = dict(re.findall(r"^(.+?)\s+([0-9.]+) ns/element$", out.stdout, flags=re.M))
    assert len(costs) == 12, out.stdout
    assert all(float(v) > 0 for v in costs.values()), costs
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_block_costs.py"), "--elements", "100"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--elements must be a positive multiple of 256, got 100" in bad.stderr

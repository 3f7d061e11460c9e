"""bench/cpu_block_costs.py compiles the CPU kernel's own source with its timing harness: it must
keep building and report every part (its figures back the README's reading of the 8-bit step)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def extensions_dir(tmp_path_factory):  # a fresh build, not a cached one; shared by the tests here
    return str(tmp_path_factory.mktemp("torch_extensions"))


def test_block_cost_tool_builds_and_times_every_part(extensions_dir):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=extensions_dir)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_block_costs.py"), "--elements", "1024",
                          "--reps", "3", "--rounds", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    costs = dict(re.findall(r"^(.+?)\s+([0-9.]+) ns/element$", out.stdout, flags=re.M))
    assert len(costs) == 13, out.stdout
    assert all(float(v) > 0 for v in costs.values()), costs
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_block_costs.py"), "--elements", "100"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--elements must be a positive multiple of 256, got 100" in bad.stderr


def test_block_cost_tool_times_another_checkout_in_the_same_rounds(extensions_dir, tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=extensions_dir)
    tool = os.path.join(ROOT, "bench", "cpu_block_costs.py")
    out = subprocess.run([sys.executable, tool, "--elements", "1024", "--reps", "3", "--rounds", "2",
                          "--against", ROOT], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^(.+?)\s+([0-9.]+) ns/element, against\s+([0-9.]+): ([0-9.]+)x$", out.stdout, flags=re.M)
    assert len(rows) == 13, out.stdout
    for name, this, that, ratio in rows:
        assert float(this) > 0 and float(that) > 0, name
        want = float(this) / float(that)  # of the printed (rounded) times: their rounding's error allowed
        assert abs(float(ratio) - want) <= 0.0005 + want * 0.0005 * (1 / float(this) + 1 / float(that)), (name, ratio)
    # an older harness without the last part: that part is timed here only, the rest against it
    older = tmp_path / "older"
    (older / "bench").mkdir(parents=True)
    os.symlink(os.path.join(ROOT, "csrc"), older / "csrc")
    with open(os.path.join(ROOT, "bench", "cpu_block_costs.cpp")) as f:
        harness = f.read()
    (older / "bench" / "cpu_block_costs.cpp").write_text(harness)
    with open(tool) as f:
        script = f.read()
    assert script.count('"sqrt and divide alone"') == 1  # PARTS' last name (a list with a trailing comma left)
    (older / "bench" / "cpu_block_costs.py").write_text(script.replace('"sqrt and divide alone"', ""))
    out = subprocess.run([sys.executable, tool, "--elements", "1024", "--reps", "3", "--rounds", "1",
                          "--against", str(older)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(re.findall(r"ns/element, against", out.stdout)) == 12, out.stdout
    assert re.search(r"^sqrt and divide alone\s+[0-9.]+ ns/element, not in that checkout$", out.stdout, flags=re.M)
    bad = subprocess.run([sys.executable, tool, "--against", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "--against must be a checkout of this project" in bad.stderr, bad.stderr

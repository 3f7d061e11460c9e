"""What the README says about installing holds for the files that install."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_requirements_pin_torch_exactly():
    # a loose torch requirement resolves to a multi-GB CUDA build on a plain machine
    pins = re.findall(r"^torch\s*([=<>!~]=?)\s*([\w.+]+)\s*$", _read("requirements.txt"), re.M)
    assert pins == [("==", "2.13.0")], pins


def test_package_bounds_torch_to_tested_releases():
    import tomllib

    project = tomllib.loads(_read("pyproject.toml"))["project"]
    assert "torch>=2.11,<2.14" in project["dependencies"]
    assert project["requires-python"] == ">=3.10" and project["name"] == "spd_kernels"


def test_readme_says_how_a_cpu_only_machine_gets_the_cpu_build():
    readme = _read("README.md")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    # the two set-up commands stay as .ci/run runs them
    assert "pip install -r requirements.txt && pip install --no-build-isolation -e . && python -m pytest -q" in readme
    assert "python -m pytest -q" in _read(".ci/run")


def test_demo_module_imports_only_what_the_package_needs():
    # the demo's data and plotting libraries load when it runs, not when it is imported
    code = ("import sys, spd_kernels.demo; "
            "assert not {'sklearn', 'matplotlib', 'triton'} & set(sys.modules), sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

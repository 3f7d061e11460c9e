"""What the README says about installing holds for the files that install."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_requirements_pin_torch_exactly():
    # a loose torch requirement resolves to a multi-GB CUDA build on a plain machine
    pins = re.findall(r"^torch\s*([=<>!~]=?)\s*([\w.+]+)\s*$", _read("requirements.txt"), re.M)
    assert pins == [("==", "2.13.0")], pins


def test_package_bounds_torch_to_tested_releases():
    assert '"torch>=2.11,<2.14"' in _read("setup.py")


def test_readme_says_how_a_cpu_only_machine_gets_the_cpu_build():
    readme = _read("README.md")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    # the two set-up commands stay as .ci/run runs them
    assert "pip install -r requirements.txt && pip install --no-build-isolation -e . && python -m pytest -q" in readme
    assert "python -m pytest -q" in _read(".ci/run")

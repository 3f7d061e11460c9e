"""The command line explains itself: ``--help`` everywhere, every option documented."""
from __future__ import annotations

import subprocess
import sys

import pytest

from spd_kernels import __main__ as cli
from spd_kernels.bench import param_sets


def _run(*args):
    return subprocess.run([sys.executable, "-m", "spd_kernels", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_command(flag):
    out = _run(flag)
    assert out.returncode == 0, out.stderr
    for command in cli.COMMANDS:
        assert f"  {command}  " in out.stdout


def test_no_or_unknown_command_prints_usage_and_exits_2():
    assert _run().returncode == 2
    out = _run("train")
    assert out.returncode == 2 and "unknown command 'train'" in out.stderr and "commands:" in out.stderr


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_of_every_command_is_documented(command):
    module = __import__(f"spd_kernels.{command}", fromlist=["build_parser"])
    parser = module.build_parser()
    undocumented = [a.dest for a in parser._actions if a.help in (None, "")]
    assert not undocumented, undocumented
    out = _run(command, "--help")
    assert out.returncode == 0, out.stderr
    for action in parser._actions:
        for option in action.option_strings:
            assert option in out.stdout


def test_set_options_list_and_check_their_names():
    out = _run("bench", "--help")
    for name in param_sets.NAMES:
        assert name in out.stdout
    bad = _run("bench", "--sets", "vit_b,resnet")
    assert bad.returncode == 2 and "unknown set(s) ['resnet']" in bad.stderr and "many_small" in bad.stderr
    bad = _run("verify", "--set", "resnet")
    assert bad.returncode == 2 and "invalid choice: 'resnet'" in bad.stderr


def test_bench_plot_title_says_which_sizes_ran():
    from spd_kernels.bench.report import plot_title

    meta = dict(device_name="a CPU", torch="2.x")
    assert "--small" in plot_title({**meta, "small": True})
    assert "full-size" in plot_title({**meta, "small": False})

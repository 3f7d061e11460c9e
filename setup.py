"""The CPU kernel build. Package metadata is in pyproject.toml.

The CPU kernel (csrc/) is a torch C++ extension. Install with
`pip install --no-build-isolation -e .` so the build sees the installed torch.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch at build time: the package still installs and falls back to the reference
    CppExtension = None

if CppExtension is not None and os.environ.get("SPD_KERNELS_NO_EXT", "0") == "0":
    # Built where it runs (editable install), so it may use this CPU's vector units;
    # SPD_KERNELS_PORTABLE=1 builds for the baseline ISA instead.
    arch = [] if os.environ.get("SPD_KERNELS_PORTABLE", "0") != "0" else ["-march=native"]
    ext_modules.append(
        CppExtension(
            "spd_kernels._C",
            # the ops' entry and one file per moment-format pair, which the build compiles in parallel
            ["csrc/adam_spd_cpu.cpp", *sorted(glob.glob("csrc/pairs/*.cpp"))],
            depends=sorted(glob.glob("csrc/cpu/*.h")),
            # -fno-math-errno lets sqrt vectorize; -fopenmp makes at::parallel_for parallel
            # (it binds to the libgomp torch already loaded); -g0: the debug info of several hundred
            # instantiations took a third of the build time and made the library 9x larger.
            extra_compile_args=["-g0", "-O3", "-fno-math-errno", "-fopenmp", *arch],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)

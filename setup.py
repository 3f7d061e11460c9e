import os

from setuptools import find_packages, setup

# The CPU kernel (csrc/) is a torch C++ extension. Install with
# `pip install --no-build-isolation -e .` so the build sees the installed torch.
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
            ["csrc/adam_spd_cpu.cpp"],
            # -fno-math-errno lets sqrt vectorize; -fopenmp makes at::parallel_for parallel
            # (it binds to the libgomp torch already loaded).
            extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp", *arch],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    name="spd_kernels",
    version="0.1.0",
    description="Selective Projection Decay (AdamSPD): a drop-in torch optimizer with fused kernels",
    packages=find_packages(include=["spd_kernels", "spd_kernels.*"]),
    python_requires=">=3.10",
    # Bounded so a resolver never pulls an untested major release; the CPU
    # machines use torch 2.13 + triton 3.9, the GPU machines torch 2.11 + triton 3.6.
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4", "numpy>=1.26"],
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60"],
        "hf": ["transformers>=4.40,<6", "peft>=0.10", "accelerate>=0.26"],
        "stacks": ["deepspeed==0.19.8", "pytorch-lightning==2.6.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

from setuptools import find_packages, setup

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
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4", "numpy>=1.26"]},
)

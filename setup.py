"""Build/install fastprune: the Python package, its Triton kernels and the CUDA sources.

`triton_kernels/` installs as `fastprune.triton_kernels` (package_dir) so it never shadows the
unrelated PyPI package called `triton_kernels`. CUDA sources under `csrc/` ship as package data
and are compiled lazily on first use on a CUDA machine.
"""

from pathlib import Path

from setuptools import setup

setup(
    name="fastprune",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and exact reference solvers for one-shot LLM pruning",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastprune", "fastprune.ops", "fastprune.triton_kernels", "fastprune.csrc"],
    package_dir={
        "fastprune": "fastprune",
        "fastprune.triton_kernels": "triton_kernels",
        "fastprune.csrc": "csrc",
    },
    package_data={"fastprune.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "cuda": ["ninja", "pybind11"],
        "test": ["pytest>=7", "ruff"],
    },
    entry_points={"console_scripts": ["fastprune=fastprune.cli:main"]},
)

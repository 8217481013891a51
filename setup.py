"""megatrain: Transformer/CNN/RNN training over DeepSpeed with 3D parallelism and fused kernels.

Triton kernels live in ./kernels and install as ``megatrain.triton_kernels`` (the top-level name
``kernels`` is taken on PyPI). C++/CUDA extensions under ./csrc are built when a toolchain is
present; a missing toolchain never breaks the install (see ``_extensions``).
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _extensions():
    """C++/CUDA extension modules and the build_ext class, or ([], {}) without a toolchain."""
    try:
        from csrc.build import extensions_and_cmdclass  # owned by csrc/, optional
    except ImportError:
        return [], {}
    return extensions_and_cmdclass()


ext_modules, cmdclass = _extensions()

setup(
    name="megatrain",
    version="0.1.0",
    description="Thin orchestration layer over DeepSpeed: 3D parallelism, fused kernels, compression",
    python_requires=">=3.10",
    packages=find_packages(include=["megatrain", "megatrain.*"]) + ["megatrain.triton_kernels"],
    package_dir={"megatrain.triton_kernels": "kernels"},
    # the chat JSONL megatrain ships (data.sources: [chat_demo]; written by megatrain/data/chat_demo.py)
    package_data={"megatrain.data": ["corpora/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "pydantic>=2",
        "PyYAML",
        "numpy",
        "sentencepiece",
        "safetensors",
        "transformers>=4.40",
        "tensorboard",
        "matplotlib",
        "rich",
        "tqdm",
        "scikit-learn",
    ],
    extras_require={"dev": ["pytest", "ninja==1.13.2", "optuna", "accelerate", "peft"], "triton": ["triton"], "search": ["optuna"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["megatrain=megatrain.cli:main"]},
)

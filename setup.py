"""Installs the four packages of the project: models, parallel, pretrain, data_pipeline."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=4.46",
    "accelerate>=1.1",  # transformers.TrainingArguments / Trainer (docs/training.md#hugging-face-trainer)
    "safetensors>=0.4",
    "deepspeed>=0.15",
    "megatron-core>=0.9",
    "datasets>=2.19",
    "sentencepiece>=0.2",
    "accelerated-scan>=0.2",
    "tensorboard>=2.15",
    "numpy",
    "tqdm",
    "pyyaml",
    "zstandard",
]

EXTRAS = {
    # CUDA-only builds: never required on CPU; every user has a pure-PyTorch fallback.
    "gpu": ["transformer-engine[pytorch]", "causal-conv1d>=1.2", "torchao>=0.8", "triton"],
    "sweep": ["scipy", "matplotlib", "pandas"],
    "eval": ["matplotlib"],  # python -m pretrain.evaluate's plots
    # benchmark-only: bench.layer --impls fla (flash-linear-attention's kernels side by side; pure Python)
    "bench": ["flash-linear-attention>=0.6"],
    # triton: its CPU interpreter runs the Triton kernels' tests (tests/models/test_triton_ttt.py)
    # flash-linear-attention: tests/models/test_fla_bench.py checks bench.layer's fla wiring on CPU
    "test": ["pytest>=8", "pytest-timeout", "scipy", "matplotlib", "pandas", "triton>=3.0",
             "flash-linear-attention>=0.6"],
}

setup(
    name="memtrain",
    version="0.1.0",
    description="Distributed, large-scale pretraining of memory (test-time-training) layers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["models*", "parallel*", "pretrain*", "data_pipeline*", "bench*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)

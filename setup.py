"""engram-jax: Engram conditional memory (DeepSeek, 2026) in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="engram-jax",
    version="0.1.0",
    description="Engram conditional memory for language models in JAX / Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engram_jax", "engram_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.0",
        "tensorstore>=0.1.80",
        "numpy>=2.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6"],
        # libtpu must match jaxlib: jax[tpu]==0.10.2 pins libtpu 0.0.42.1 (bump them together;
        # tests/test_tpu_compile.py installs the same libtpu on its own)
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["engram-jax=engram_jax.cli:main"]},
)

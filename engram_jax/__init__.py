"""engram-jax: Engram conditional memory (arXiv 2601.07372) in JAX / Flax NNX."""

from engram_jax.config import Config, EngramConfig, ModelConfig, MoEConfig

__all__ = ["Config", "EngramConfig", "ModelConfig", "MoEConfig"]
__version__ = "0.1.0"

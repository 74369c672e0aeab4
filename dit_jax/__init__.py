"""dit_jax: DiT (Diffusion Transformers) in JAX/Flax NNX, faithful to the official release."""

from dit_jax.diffusion import create_diffusion
from dit_jax.models.dit import DIT_CONFIGS, DiT, DiTConfig, count_params, create_model

__version__ = "0.1.0"

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "count_params", "create_diffusion", "create_model"]

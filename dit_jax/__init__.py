"""dit_jax: DiT (Diffusion Transformers) in JAX/Flax NNX, faithful to the official release."""

from dit_jax.models.dit import DIT_CONFIGS, DiT, DiTConfig, count_params, create_model

__version__ = "0.1.0"


def __getattr__(name):
    # Diffusion is imported lazily so that `import dit_jax` stays cheap for model-only users.
    if name == "create_diffusion":
        from dit_jax.diffusion import create_diffusion
        return create_diffusion
    raise AttributeError(f"module 'dit_jax' has no attribute {name!r}")


__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "count_params", "create_diffusion", "create_model"]

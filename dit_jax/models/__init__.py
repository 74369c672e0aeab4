from dit_jax.models.dit import DIT_CONFIGS, DiT, DiTConfig, count_params, create_model

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "count_params", "create_model"]

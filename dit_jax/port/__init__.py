"""PyTorch ↔ JAX weight ports: DiT (official checkpoints, train.py dicts, diffusers), SiT and REPA
checkpoints (`from_torch(path, kind="sit" | "repa")`), PixArt-α (`load_pixart`, `save_pixart`),
the VAE, and the T5 text encoder with its tokenizer."""

from dit_jax.port.dit import (from_diffusers, load_any, read_checkpoint, save_diffusers,
                              to_diffusers)
from dit_jax.port.pixart import load_pixart, save_pixart
from dit_jax.port.sit import from_torch, save_torch, to_torch
from dit_jax.port.t5 import load_t5_encoder, load_t5_tokenizer
from dit_jax.port.vae import load_vae, vae_from_torch_state_dict

__all__ = ["from_diffusers", "from_torch", "load_any", "load_pixart", "read_checkpoint",
           "save_diffusers", "save_pixart", "save_torch", "to_diffusers", "to_torch", "load_vae",
           "vae_from_torch_state_dict", "load_t5_encoder", "load_t5_tokenizer"]

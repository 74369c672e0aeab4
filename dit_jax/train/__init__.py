"""Training: the train state and optimiser (`state`), the jitted step (`step`), the loop
(`loop.train`), checkpoints (`checkpoint`, incl. `restore_model`) and logging/MFU (`logging`)."""

from dit_jax.train.checkpoint import Checkpoints, restore_model
from dit_jax.train.loop import NonFiniteLossError, initialize_distributed, train

__all__ = ["Checkpoints", "NonFiniteLossError", "initialize_distributed", "restore_model", "train"]

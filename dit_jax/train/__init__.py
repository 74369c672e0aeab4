"""Training: the train state and optimiser (`state`), the jitted step (`step`), the loop
(`loop.train`) and logging/MFU (`logging`). Workdir checkpoints are `dit_jax.checkpoint`."""

from dit_jax.checkpoint import Checkpoints, restore_model
from dit_jax.distributed import initialize_distributed
from dit_jax.train.loop import NonFiniteLossError, train

__all__ = ["Checkpoints", "NonFiniteLossError", "initialize_distributed", "restore_model", "train"]

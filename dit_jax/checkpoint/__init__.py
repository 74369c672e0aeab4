"""Checkpoints: a model as a directory (`model`: weights and DiTConfig, what `python -m
dit_jax.port to-jax` writes) and a train.py workdir (`workdir`: training checkpoints, the run's
config files, a model read back out of it)."""

from dit_jax.checkpoint.model import (CONFIG_FILE, PARAMS_DIR, RUNTIME_FIELDS, config_from_dict,
                                      config_to_dict, is_model_checkpoint, load_model, save_model,
                                      with_config)
from dit_jax.checkpoint.integrity import digest, digests
from dit_jax.checkpoint.lock import LOCK_FILE, WorkdirLock, WorkdirLockedError
from dit_jax.checkpoint.workdir import (CHECKPOINT_DIR, RUN_CONFIG_FILE, Checkpoints,
                                        CorruptCheckpointError, NonFiniteStateError,
                                        ResumeMismatchError, is_train_workdir, load_model_config,
                                        read_run_config, restore_model,
                                        step_with_checksum, write_run_config)

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "LOCK_FILE", "PARAMS_DIR", "RUNTIME_FIELDS",
           "RUN_CONFIG_FILE", "Checkpoints", "CorruptCheckpointError", "NonFiniteStateError",
           "ResumeMismatchError", "WorkdirLock", "WorkdirLockedError", "config_from_dict",
           "config_to_dict", "digest", "digests", "is_model_checkpoint", "is_train_workdir",
           "load_model", "load_model_config", "read_run_config", "restore_model", "save_model",
           "step_with_checksum", "with_config", "write_run_config"]

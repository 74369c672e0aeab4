"""Train a DiT: `python train.py --config=configs/dit.py:XL/2 --workdir=DIR [--config.key=value ...]`.

Running the same command again with the same workdir resumes from its newest checkpoint. On
several hosts, run the same command on every host (see docs/launch.md). Exit status: 0 when
total_steps are done, 143 after a preemption save (SIGTERM), 1 on a non-finite loss, 2 when
the run cannot start as asked (a config value, a locked workdir, a resume with another model).
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dit_jax.distributed import initialize_distributed
from dit_jax.train.loop import NON_FINITE_ERRORS, PREEMPTED_EXIT_CODE, SETUP_ERRORS, train

config_flags.DEFINE_config_file("config", None, "training config file (e.g. configs/dit.py:XL/2)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "call jax.distributed.initialize: auto = when launched as several processes")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "index of this process (multi-process runs)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # Orbax logs every file it writes at INFO; keep the console to this project's messages.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("dit_jax").setLevel(logging.INFO)
    initialize_distributed(FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    try:
        result = train(FLAGS.config, FLAGS.workdir)
    except NON_FINITE_ERRORS as err:
        logging.error("%s", err)
        sys.exit(1)
    except SETUP_ERRORS as err:  # the run cannot start as asked: one line, no traceback
        logging.error("%s", err)
        sys.exit(2)
    if result["status"] == "preempted":
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main)

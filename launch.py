"""Train an OmniMoE (or baseline) LM: `python launch.py --config configs/NAME.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.train.steps=1000 --config.mesh.fsdp=2`.
A workdir that holds checkpoints is resumed. Several processes (hosts): pass
`--num_processes`, `--process_id` and `--coordinator_address` (or set JAX_COORDINATOR_ADDRESS),
or `--distributed` to let `jax.distributed.initialize()` detect a cluster (SLURM, Open MPI,
Kubernetes, TPU pods). Exit status: 0 when the run finished or was stopped by SIGTERM or
SIGINT (after saving; with several processes, a signal to any of them stops all of them at
one step), 1 on a config error, a diverged run or a checkpoint folder of which no step
could be read.
"""
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from omnimoe import checkpoint, metrics, train
from omnimoe.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with cluster detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  if _DISTRIBUTED.value or _NUM_PROCESSES.value > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU runs need it
    if _DISTRIBUTED.value:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, train.TrainingDiverged, checkpoint.NoReadableCheckpoint) as e:
    logging.error("%s: %s", type(e).__name__, e)
    raise SystemExit(1) from e


if __name__ == "__main__":
  app.run(main)

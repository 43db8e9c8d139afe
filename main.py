"""flowmap: train, evaluate or apply a flow map between two encoders' feature spaces.

  python main.py                                   # the demo, into runs/demo
  python main.py --config configs/eva_to_clip.py --workdir runs/x [--config.train.steps=N]
  python main.py --config ... --workdir runs/x --mode eval
  python main.py --config ... --workdir runs/x --mode map --config.map.input=D --config.map.output=O
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # config files import `configs.default`



# Exit codes: 0 done, 1 a non-finite loss, 2 a bad configuration or dataset (before any work),
# 75 (EX_TEMPFAIL) stopped by a signal after saving a checkpoint: run the same command again,
# or let the batch script requeue the job (README, "Preemption").
EXIT_PREEMPTED = 75


def fail(message: str, code: int = 2):
  print(f"flowmap: error: {message}", file=sys.stderr)
  sys.exit(code)


def unknown_key(error: BaseException, argv) -> str:
  """One line naming the override(s) whose key the config does not have: ml_collections
  raises a bare KeyError/AttributeError holding just the missing field's name."""
  name = str(error).strip().strip("'\"")
  overrides = [a for a in argv if a.startswith("--config.")]
  culprits = [a for a in overrides if name in a.split("=", 1)[0].split(".")[1:]] or overrides
  return (f"unknown config key {name!r} in {' '.join(culprits)}; "
          "configs/default.py lists every key")


try:   # with the default --config, config_flags reads the --config.* overrides already here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(HERE, "configs", "demo.py"), "ml_collections config file.",
      lock_config=True)
except (KeyError, AttributeError) as e:
  fail(unknown_key(e, sys.argv[1:]))
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "map"], "What to do.")
flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0 "
                    "(not needed under SLURM).")
flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", -1, "Multi-process: this process's id.")
FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl's parser, but a bad flag or config override is one line and exit code 2."""
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError) as e:   # an override of a key the config lacks
    fail(unknown_key(e, argv[1:]))
  except (flags.Error, ValueError, TypeError) as e:
    fail(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)   # orbax and tfds are chatty below ERROR
  from flowmap import config as errors
  config = _CONFIG.value
  config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
      FLAGS["config"])))[0]
  workdir = FLAGS.workdir or os.path.join("runs", config_name)
  from flowmap import platform
  platform.set_xla_flags()   # before JAX starts: XLA reads its flags once
  from flowmap import data
  data.tensorflow()          # imported once, GPUs hidden from it, before anything uses it
  try:
    from flowmap import sharding
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    import jax
    if jax.process_index() == 0:
      dtype = platform.resolve_dtype(config.model.dtype, jax.default_backend())
      print(f"flowmap {FLAGS.mode}: {config_name} -> {workdir} on {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es), "
            f"compute dtype {dtype}")
    if FLAGS.mode == "train":
      from flowmap import train
      results = train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "eval":
      from flowmap import evaluate
      results = evaluate.evaluate_workdir(config, workdir)
    else:
      from flowmap import export
      results = export.map_dataset(config, workdir)
  except errors.ConfigError as e:
    fail(str(e))
  except errors.NonFiniteError as e:
    fail(str(e), code=1)
  except errors.Preempted as e:
    print(f"flowmap: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  if jax.process_index() == 0 and results:
    if any(k.startswith("eval/") for k in results):
      from flowmap import plots
      print(plots.summary(results, config.eval.mode))
    else:
      print(" ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
    print(f"workdir: {os.path.abspath(workdir)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""One small trained run shared by the evaluation, mapper and notebook tests.

The synthetic demo task with 1024 training images and a 2-layer model: 400 steps take about
a minute on two CPU cores and put flowmap clearly above the per-token ridge baseline. The
run logs to W&B in offline mode, so the optional W&B path of training is exercised too.
"""

import os

from conftest import tiny_config

STEPS = 400
TRAIN_SIZE = 1024
VALIDATION_SIZE = 64
CONFIG_FILE = "run_config.py"


def small_config(data_dir: str):
  c = tiny_config(data_dir, steps=STEPS)
  c.train.batch_size = 32
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.eval.num_images = VALIDATION_SIZE
  c.eval.batch_size = 64
  c.eval.steps = 8
  c.flow.cond_dropout = 0.1   # guidance needs the unconditional velocity
  c.eval.baselines = ("procrustes", "mlp")   # the whole ladder, as a user's run has it
  c.model.prior = "auto"   # the default: the MLP or the linear map, the ladder's MLP reused
  c.wandb.project = "flowmap-tests"
  return c


def train_small_run(root) -> dict:
  """Trains the run into root/run; returns {workdir, data_dir, config, config_file}.

  ``config_file`` is a config file for main.py that rebuilds this run's config, so
  subprocess tests can pass ``--config`` exactly as a user would."""
  from flowmap import synthetic, train
  root = str(root)
  data_dir = os.path.join(root, "data")
  synthetic.write_demo_dataset(data_dir, train_size=TRAIN_SIZE,
                               validation_size=VALIDATION_SIZE)
  workdir = os.path.join(root, "run")
  config = small_config(data_dir)
  saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
  os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
  try:
    results = train.train_and_evaluate(config, workdir)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  config_file = os.path.join(root, CONFIG_FILE)
  with open(config_file, "w") as f:
    f.write("import sys\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "import conftest_run\n\n\n"
            "def get_config():\n"
            f"  return conftest_run.small_config({data_dir!r})\n")
  return {"workdir": workdir, "data_dir": data_dir, "config": config,
          "config_file": config_file, "results": results}

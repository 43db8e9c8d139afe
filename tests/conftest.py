"""Shared fixtures. Tests run on the CPU; multi-device tests start their own subprocesses
with XLA_FLAGS set, since the device count is fixed once JAX starts."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# For subprocesses with many virtual devices: on two cores their threads can reach a
# collective more than XLA's default 40 s apart (it aborted one CI run), so they wait longer.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from flowmap import platform as _platform   # noqa: E402  (XLA flags before JAX starts)

_platform.set_xla_flags()
# One persistent compilation cache for the session, subprocesses included: the many small
# runs share programs, so each compiles once.
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"flowmap-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def tiny_config(data_dir: str = "", steps: int = 20):
  """The demo config shrunk for tests: a 2-layer model, a small synthetic dataset."""
  from configs import demo
  c = demo.get_config()
  c.data.dir = data_dir
  c.data.synthetic.train_size = 256
  c.data.synthetic.validation_size = 32
  c.model.dim = 64
  c.model.depth = 2
  c.model.heads = 4
  c.train.steps = steps
  c.train.batch_size = 16
  c.train.warmup_steps = 5
  c.train.log_every = 5
  c.train.eval_every = steps
  c.train.checkpoint_every = steps
  c.eval.num_images = 32
  c.eval.batch_size = 32
  c.eval.steps = 2
  c.eval.baselines = ()   # the mean and the ridge only: the MLP rung costs seconds a run
  c.model.prior = "linear"   # likewise the MLP prior (conftest_run's shared run has auto)
  return c


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
  """A small synthetic features dataset shared by the whole session."""
  from flowmap import synthetic
  path = str(tmp_path_factory.mktemp("demo_data"))
  synthetic.write_demo_dataset(path, train_size=256, validation_size=32)
  return path


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
  """One trained run shared by the evaluation, mapper and notebook tests (conftest_run.py)."""
  import conftest_run
  return conftest_run.train_small_run(tmp_path_factory.mktemp("small_run"))


def run_main(args, timeout=600, env=None):
  """Runs main.py in a subprocess; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args],
                        capture_output=True, text=True, timeout=timeout, env=full_env,
                        cwd=ROOT)

"""Two processes with 4 CPU devices each, joined by jax.distributed on localhost, train the
demo model to the same parameters and evaluation figures as one process with 8 devices.

The demo's training split fits in memory, so data.train_batches draws one global permutation
per epoch and each process keeps its block of rows of every global batch: both runs see the
same global batches, and each process feeds only its own devices. The two-process mesh is
data=2 x fsdp=4 (parameters split inside each process, gradients reduced across them), the
one-process mesh data=8, so the comparison also covers FSDP against plain data parallelism,
in training and in evaluation, and a checkpoint written by two processes read back by one."""

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import PATIENT_COLLECTIVES, ROOT
from flowmap import checkpoint as checkpoint_lib
from flowmap import data as data_lib
from flowmap import model as model_lib
from flowmap import sharding
from flowmap import train

STEPS = 6
OVERRIDES = {   # on top of configs/demo.py
    "model.dim": 64, "model.depth": 2, "model.heads": 4,
    "train.steps": STEPS, "train.batch_size": 16, "train.warmup_steps": 2,
    "train.log_every": 3, "train.eval_every": STEPS, "train.checkpoint_every": STEPS,
    "eval.num_images": 32, "eval.batch_size": 16, "eval.steps": 2, "eval.baselines": (),
    "model.prior_mlp_steps": 200,   # every process fits the auto prior's MLP, briefly
    # float32 on every CPU: the two meshes compile to different programs, and on a CPU where
    # model.dtype=auto picks bfloat16 their roundings differ by ~3e-4 relative in a few
    # parameters, far above what the distributed logic itself may change (bfloat16 against
    # float32 is tested in test_sharding.py)
    "model.dtype": "float32",
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


GLOO_LATE = "Gloo context initialization failed"


def launch(workdir, data_dir, devices: int, mesh: tuple[int, int], process_id=None,
           num_processes=1, port=0):
  args = [sys.executable, os.path.join(ROOT, "main.py"), "--workdir", str(workdir),
          f"--config.data.dir={data_dir}", f"--config.mesh.data={mesh[0]}",
          f"--config.mesh.fsdp={mesh[1]}",
          *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
  if num_processes > 1:
    args += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
             f"--process_id={process_id}"]
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"--xla_force_host_platform_device_count={devices} "
                                   "--xla_backend_optimization_level=0 "   # compile faster
                                   + PATIENT_COLLECTIVES)
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=900) -> list[tuple[int, str]]:
  outputs = []
  try:
    for p in procs:
      outputs.append((p.communicate(timeout=timeout)[0], p.returncode))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(code, out) for out, code in outputs]


def train_two_processes(base, data_dir, attempts: int = 3):
  """The two-process run; returns its workdir.

  JAX's CPU collectives (gloo) give up when a process joins a new collective more than 30 s
  after its peer (a fixed deadline, no flag changes it), which two processes compiling side
  by side on a loaded 2-core machine can be. Such a run is started again in a fresh workdir:
  process 0 has put the programs compiled so far into the persistent compilation cache that
  conftest sets up, so the processes reach them together. Any other failure fails the test.
  """
  for attempt in range(attempts):
    workdir = base / f"attempt{attempt}"
    port = free_port()
    results = finish([launch(workdir, data_dir, 4, (2, 4), i, 2, port) for i in range(2)])
    if all(code == 0 for code, _ in results):
      return workdir
    logs = "\n\n".join(f"process {i} (exit {code}):\n{out[-3000:]}"
                        for i, (code, out) in enumerate(results))
    assert any(GLOO_LATE in out for _, out in results), logs
  pytest.fail(f"{attempts} attempts, every one stopped by a late gloo peer:\n{logs}")


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def restore_on_one_device(workdir, data_dir):
  """The final checkpoint of ``workdir``, restored onto this process's first device."""
  from configs import demo
  c = demo.get_config()
  for k, v in OVERRIDES.items():
    section, key = k.split(".")
    c[section][key] = v
  stats = data_lib.load_stats(data_dir)
  model_cfg = model_lib.config_from(
      c.model, data_lib.feature_shape(stats, c.data.source),
      data_lib.feature_shape(stats, c.data.target))
  _, _, shapes = train.abstract_state(model_cfg, train.make_optimizer(c), c.seed)
  one = sharding.replicated(sharding.make_mesh(
      ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1]))
  reader = checkpoint_lib.Checkpointer(str(workdir), read_only=True)
  step, state = reader.restore(jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes))
  reader.close()
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.slow
def test_two_processes_of_4_devices_match_one_process_of_8(tmp_path, demo_data):
  two = train_two_processes(tmp_path / "two_processes", demo_data)
  one = tmp_path / "one_process"
  [(code, out)] = finish([launch(one, demo_data, 8, (8, 1))])
  assert code == 0, out[-4000:]

  rows = {name: read_jsonl(w / "metrics.jsonl") for name, w in (("two", two), ("one", one))}
  # only process 0 writes: one row per logging event, as in the one-process run
  assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["one"]]
  train_rows = {n: [r for r in rs if "train/loss" in r] for n, rs in rows.items()}
  assert [r["step"] for r in train_rows["two"]] == [3, 6]
  for a, b in zip(train_rows["two"], train_rows["one"]):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
  evals = {n: next(r for r in rs if "eval/cosine_token" in r) for n, rs in rows.items()}
  for key in ("eval/cosine_token", "eval/cosine_global", "eval/mse", "eval/velocity_cosine"):
    np.testing.assert_allclose(evals["two"][key], evals["one"][key], rtol=1e-4, atol=1e-6,
                               err_msg=key)
  assert evals["two"]["eval/recall_at_1"] == evals["one"]["eval/recall_at_1"]
  assert (two / "eval" / f"{STEPS}.json").exists() and (two / "plots" / "training.png").exists()

  # every process took part in the save; it restores on one device
  steps = {}
  for name, w in (("two", two), ("one", one)):
    steps[name] = restore_on_one_device(w, demo_data)
  assert steps["two"][0] == steps["one"][0] == STEPS
  got, want = steps["two"][1], steps["one"][1]
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)

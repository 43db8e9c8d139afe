"""Faults: preemption, damaged checkpoints, non-finite values, bad input. Subprocess-driven
where the behaviour is about the process (signals, exit codes)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_main, tiny_config
from flowmap import data as data_lib
from flowmap import train
from flowmap.config import ConfigError, NonFiniteError


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# The linear map as the prior: fitting the default (auto) MLP costs ~20 s per fresh workdir on
# two cores, and its save and resume are tested in test_prior.py.
LINEAR_PRIOR = ("--config.model.prior=linear",)


def small_args(workdir, demo_data, steps):
  return ["--workdir", str(workdir), f"--config.data.dir={demo_data}",
          "--config.model.dim=64", "--config.model.depth=2", "--config.train.batch_size=16",
          f"--config.train.steps={steps}", "--config.train.checkpoint_every=1000",
          "--config.train.eval_every=100000", "--config.train.log_every=5",
          "--config.eval.num_images=32", *LINEAR_PRIOR]


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_the_batch_script_requeues(tmp_path, demo_data):
  """slurm/train.sbatch as SLURM runs it (srun and scontrol stand-ins on PATH): SIGTERM, as
  --signal=TERM@300 sends it, makes main.py save a checkpoint at the current step and exit
  with 75, and the script then asks SLURM to requeue the job."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
  (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
  for f in ("srun", "scontrol"):
    os.chmod(bin_dir / f, 0o755)
  workdir = tmp_path / "run"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:"
                              f"{os.environ['PATH']}", SLURM_JOB_ID="4242")
  proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "train.sbatch"),
                           *small_args(workdir, demo_data, 100000)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while time.time() < deadline:   # wait until training is under way
    if (workdir / "metrics.jsonl").exists():
      break
    time.sleep(0.5)
  children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
  os.kill(int(children.stdout.split()[0]), signal.SIGTERM)   # main.py, as SLURM signals it
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]
  assert "stopped by SIGTERM at step" in err and "run the same command again" in err
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < 100000
  stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert saved[0] == stopped_at
  assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def damage(step_dir, how):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  if how == "truncate":
    for path in files:   # truncate every array data file to half
      if os.sep + "d" + os.sep in path:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
          f.truncate(size // 2)
  else:
    for path in files:
      if os.path.basename(path) in ("_METADATA", "manifest.ocdbt"):
        os.remove(path)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, demo_data):
  """A run of 10 steps with checkpoints 5 and 10; tests copy it and damage or break it."""
  path = tmp_path_factory.mktemp("two_checkpoints")
  c = tiny_config(demo_data, steps=10)
  c.train.checkpoint_every = 5
  train.train_and_evaluate(c, str(path))
  assert checkpoint_steps(path) == [5, 10]
  return c, path


def copy_of(two_checkpoints, tmp_path):
  import shutil
  c, path = two_checkpoints
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  c = c.copy_and_resolve_references()
  c.train.steps = 12
  return c


@pytest.mark.parametrize("how", ["truncate", "missing"])
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(two_checkpoints, tmp_path,
                                                                   how, capsys):
  c = copy_of(two_checkpoints, tmp_path)
  damage(tmp_path / "checkpoints" / "10", how)
  train.train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert "checkpoint 10 is damaged" in out and "resuming from step 5" in out
  assert out.count("flowmap: warning:") == 1
  assert checkpoint_steps(tmp_path) == [5, 10, 12]   # 10 saved anew from the resumed run
  assert os.listdir(tmp_path / "checkpoints" / "corrupt")   # kept, not deleted
  steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert steps == [5, 10, 10, 12]   # second run: resumed at 5, logged at 10 and the end


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),
                                   MemoryError("RESOURCE_EXHAUSTED: out of memory"),
                                   ValueError("User-provided restore item and on-disk value "
                                              "metadata tree structures do not match")])
def test_a_restore_error_that_is_not_damage_stops_and_moves_nothing(two_checkpoints, tmp_path,
                                                                     monkeypatch, error):
  """A transient filesystem error, memory, or a state tree that changed with a library
  upgrade is not damage: the run stops naming the step and the error; no checkpoint is moved
  and training does not start over."""
  from flowmap import checkpoint as checkpoint_lib
  c = copy_of(two_checkpoints, tmp_path)
  before = read_jsonl(tmp_path / "metrics.jsonl")

  def failing(self, abstract_state, step=None):
    raise error
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore", failing)
  with pytest.raises(ConfigError, match=r"cannot restore checkpoint 10 in .*: "
                                        rf"{type(error).__name__}: .*nothing was moved"):
    train.train_and_evaluate(c, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [5, 10]
  assert not (tmp_path / "checkpoints" / "corrupt").exists()
  assert read_jsonl(tmp_path / "metrics.jsonl") == before   # not one step trained


def test_every_checkpoint_damaged_stops_instead_of_starting_over(two_checkpoints, tmp_path):
  c = copy_of(two_checkpoints, tmp_path)
  for step in (5, 10):
    damage(tmp_path / "checkpoints" / str(step), "missing")
  with pytest.raises(ConfigError, match="every checkpoint in .* is damaged .* to start over on "
                                        "purpose"):
    train.train_and_evaluate(c, str(tmp_path))
  assert checkpoint_steps(tmp_path) == []
  assert len(os.listdir(tmp_path / "checkpoints" / "corrupt")) == 2   # both kept
  # And again: a workdir that held checkpoints never falls back to a fresh start.
  with pytest.raises(ConfigError, match="every checkpoint"):
    train.train_and_evaluate(c, str(tmp_path))


def test_every_host_takes_the_worst_restore_outcome(monkeypatch):
  """With several processes the outcome is agreed before anyone acts: one host that failed
  makes all stop, one that found damage makes all move on to the previous checkpoint."""
  import jax
  from jax.experimental import multihost_utils
  from flowmap import checkpoint as checkpoint_lib
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for others, expected in (([0, 0], checkpoint_lib.RESTORED), ([0, 1], checkpoint_lib.DAMAGED),
                           ([1, 2], checkpoint_lib.FAILED)):
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x, others=others: np.asarray(others))
    assert checkpoint_lib.agree(checkpoint_lib.RESTORED) == expected


def test_damage_is_identified_only_from_errors_about_the_steps_files(tmp_path):
  from flowmap.checkpoint import is_damage
  step = str(tmp_path / "checkpoints" / "10")
  assert is_damage(ValueError(f'OUT_OF_RANGE: Error reading local file "{step}/default/d/ab"'),
                   step)
  assert is_damage(ValueError(f'NOT_FOUND: Error reading local file "{step}/d/ab"'), step)
  assert is_damage(FileNotFoundError(f"Individual parameter subdirectory not found at path: "
                                     f"{step}/default/params.b."), step)
  assert not is_damage(ValueError("NOT_FOUND: /elsewhere/file"), step)
  assert not is_damage(OSError(5, "Input/output error"), step)
  assert not is_damage(ValueError(f"tree structures do not match ({step})"), step)


def poison(monkeypatch, bad_steps):
  """Feeds NaN into the training batches of the given (0-based) steps."""
  real = data_lib.train_batches

  def batches(*args, start_step=0, **kwargs):
    for i, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      if i in bad_steps:
        batch = {k: np.full_like(v, np.nan) for k, v in batch.items()}
      yield batch
  monkeypatch.setattr(data_lib, "train_batches", batches)


def test_nan_stops_training_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, demo_data, monkeypatch):
  poison(monkeypatch, {6})
  c = tiny_config(demo_data, steps=10)
  c.train.checkpoint_every = 5
  with pytest.raises(NonFiniteError, match="at step 7; the last good checkpoint is step 5"):
    train.train_and_evaluate(c, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [5]


def test_skip_nonfinite_finishes_and_counts_skips(tmp_path, demo_data, monkeypatch):
  poison(monkeypatch, {3, 7})
  c = tiny_config(demo_data, steps=10)
  c.train.skip_nonfinite = True
  results = train.train_and_evaluate(c, str(tmp_path))
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/nonfinite_steps" in r]
  assert sum(r["train/nonfinite_steps"] for r in rows) == 2
  assert np.isfinite(results["eval/cosine_token"])


def test_skip_nonfinite_stops_after_too_many_in_a_row(tmp_path, demo_data, monkeypatch):
  poison(monkeypatch, set(range(3, 20)))
  c = tiny_config(demo_data, steps=20)
  c.train.skip_nonfinite = True
  c.train.max_nonfinite_in_a_row = 3
  with pytest.raises(NonFiniteError, match="4 non-finite steps in a row"):
    train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("override,message", [
    ("--config.train.steps=0", "train.steps must be positive"),
    ("--config.eval.solver=rk4", "eval.solver must be one of"),
    ("--config.model.size=huge", "model.size must be one of"),
])
def test_invalid_values_exit_2(tmp_path, demo_data, override, message):
  result = run_main([*small_args(tmp_path / "w", demo_data, 5), override], timeout=300)
  assert result.returncode == 2, result.stderr[-1500:]
  assert message in result.stderr


def test_batch_not_divisible_by_device_count_exits_2(tmp_path, demo_data):
  result = run_main([*small_args(tmp_path / "w", demo_data, 5),
                     "--config.train.batch_size=12"], timeout=300,
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 2, result.stderr[-1500:]
  assert "divisible by the 8 devices" in result.stderr


def test_empty_data_dir_exits_2(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run_main(["--workdir", str(tmp_path / "w"), f"--config.data.dir={empty}"],
                    timeout=300)
  assert result.returncode == 2
  assert "not a features dataset" in result.stderr


def test_resuming_with_other_shapes_or_model_exits_2(tmp_path, demo_data):
  c = tiny_config(demo_data, steps=2)
  train.train_and_evaluate(c, str(tmp_path))
  c.model.dim = 32
  with pytest.raises(ConfigError, match="model.dim=64"):
    train.setup(c, str(tmp_path))


def test_resume_keeps_the_stored_normalisation_and_refuses_changed_statistics(tmp_path,
                                                                               demo_data):
  """A re-extracted dataset (same names and shapes, new statistics) must not silently change
  the space the weights were trained in."""
  import shutil
  data_dir = tmp_path / "data"
  shutil.copytree(demo_data, data_dir)
  c = tiny_config(str(data_dir), steps=2)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  spec_path = tmp_path / "run" / "normalization.json"
  stored = json.loads(spec_path.read_text())
  stats = json.loads((data_dir / "stats.json").read_text())
  stats["features"]["target_enc"]["mean"] = [m + 1.0 for m in
                                             stats["features"]["target_enc"]["mean"]]
  (data_dir / "stats.json").write_text(json.dumps(stats))
  c.train.steps = 3
  with pytest.raises(ConfigError, match="differ from those .* was trained in .*renormalize"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert json.loads(spec_path.read_text()) == stored   # untouched
  c.data.renormalize = True
  train.train_and_evaluate(c, str(tmp_path / "run"))
  renewed = json.loads(spec_path.read_text())["target_normalizer"]["mean"]
  np.testing.assert_allclose(renewed, np.asarray(stored["target_normalizer"]["mean"]) + 1.0,
                             rtol=1e-5)
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["data"]["dir"] == str(data_dir)   # the resolved path, as used


def test_limits_beyond_the_split_mean_the_whole_split(demo_data):
  size = data_lib.split_size(demo_data, "validation")
  feats = data_lib.load_features(demo_data, "validation", limit=size * 10)
  assert len(feats["key"]) == size


# ----------------------------------------------------------------------------- kill -9

KILL_STEPS, KILL_CHECKPOINT_EVERY = 40, 10


def kill_args(workdir, demo_data):
  return ["--workdir", str(workdir), f"--config.data.dir={demo_data}",
          "--config.model.dim=64", "--config.model.depth=2", "--config.train.batch_size=16",
          f"--config.train.steps={KILL_STEPS}",
          f"--config.train.checkpoint_every={KILL_CHECKPOINT_EVERY}",
          "--config.train.keep_checkpoints=2", "--config.train.eval_every=100000",
          "--config.train.log_every=1", "--config.eval.num_images=32", *LINEAR_PRIOR]


def logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:   # the last line may be half written when we look
    return [json.loads(l)["step"] for l in f if l.endswith("\n") and '"train/loss"' in l]


def saves_in_flight(workdir):
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def run_until_killed(workdir, demo_data, when, log):
  """Starts training, SIGKILLs it the moment ``when(progress)`` holds; returns the newest
  committed checkpoint at the kill and the last logged step."""
  with open(log, "a") as err:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"),
                             *kill_args(workdir, demo_data)],
                            cwd=ROOT, stdout=err, stderr=err)
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      assert proc.poll() is None, f"training ended before its kill point: {open(log).read()}"
      progress = {"logged": max(logged_steps(workdir), default=0),
                  "committed": max(checkpoint_steps(workdir), default=0),
                  "saving": bool(saves_in_flight(workdir))}
      if when(progress):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return progress
      time.sleep(0.002)
    pytest.fail("the kill point was not reached in 300 s")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def final_state(workdir):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", str(KILL_STEPS), "default"))
  return state


@pytest.mark.slow
def test_kill_9_at_three_points_then_resume_equals_the_uninterrupted_run(tmp_path, demo_data):
  import jax
  reference = tmp_path / "reference"
  result = run_main(kill_args(reference, demo_data))
  assert result.returncode == 0, result.stderr[-2000:]

  workdir, log = tmp_path / "killed", tmp_path / "killed.log"
  kills = [
      # 1. under way, before the first checkpoint: the resumed run starts from scratch
      run_until_killed(workdir, demo_data, lambda p: p["logged"] >= 3, log),
      # 2. while a checkpoint is being written (orbax writes it under a temporary name)
      run_until_killed(workdir, demo_data, lambda p: p["saving"] and p["logged"] >= 10, log),
      # 3. between checkpoints, steps past the newest one
      run_until_killed(workdir, demo_data,
                       lambda p: p["committed"] >= 20 and p["logged"] >= p["committed"] + 4,
                       log),
  ]
  assert kills[0]["committed"] == 0
  assert kills[1]["saving"] and kills[2]["logged"] > kills[2]["committed"] >= 20
  assert len({(k["committed"], k["logged"]) for k in kills}) == 3
  assert not checkpoint_steps(workdir) or max(checkpoint_steps(workdir)) < KILL_STEPS

  result = run_main(kill_args(workdir, demo_data))   # the same command until done
  assert result.returncode == 0, result.stderr[-2000:]
  resumed = int(result.stdout.split("resuming from step ")[1].split()[0])
  assert resumed >= kills[2]["committed"]   # from the newest checkpoint the kill left
  # every step was trained: the last run logged from its resume point to the end
  assert logged_steps(workdir)[-1] == KILL_STEPS

  want, got = final_state(reference), final_state(workdir)
  paths_want = jax.tree_util.tree_flatten_with_path(want)[0]
  paths_got = jax.tree_util.tree_flatten_with_path(got)[0]
  assert [p for p, _ in paths_want] == [p for p, _ in paths_got]
  assert int(want["step"]) == int(got["step"]) == KILL_STEPS
  for (path, a), (_, b) in zip(paths_want, paths_got):   # params, optimizer state and EMA
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))

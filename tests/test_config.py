"""Every bad setting stops before any work with one line and exit code 2."""

import os

import pytest

from conftest import ROOT, run_main, tiny_config
from flowmap import config as config_lib
from flowmap import workdir
from flowmap.config import ConfigError


@pytest.mark.parametrize("key,value,message", [
    ("eval.batch_size", 0, "eval.batch_size must be positive"),
    ("flow.cond_dropout", 1.0, "flow.cond_dropout must be in [0, 1)"),
    ("flow.cond_dropout", -0.1, "flow.cond_dropout must be in [0, 1)"),
    ("train.ema_decay", 1.0, "train.ema_decay must be in [0, 1)"),
    ("eval.guidance", 2.0, "needs the unconditional velocity"),   # demo: cond_dropout = 0
    ("data.source_shape", (16,), "a shape is (tokens, dim)"),
    ("data.target_shape", (0, 32), "a shape is (tokens, dim)"),
])
def test_bad_values_are_refused(key, value, message):
  c = tiny_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    workdir.validate_config(c)


def test_problems_are_reported_together():
  c = tiny_config()
  c.train.lr = -1.0
  c.eval.batch_size = 0
  with pytest.raises(ConfigError, match="train.lr must be positive, got -1.0; .*eval.batch_size"):
    workdir.validate_config(c)


def test_a_shape_set_to_none_on_the_command_line_is_unset():
  # ml_collections parses --config.data.source_shape=None into (None,)
  assert config_lib.shape_or_none((None,)) is None
  assert config_lib.shape_or_none(None) is None
  assert config_lib.shape_or_none([16, "48"]) == (16, 48)
  c = tiny_config()
  c.data.source_shape = (None,)
  workdir.validate_config(c)
  config_lib.check_dataset(c, "d", {"source_enc": (16, 48), "target_enc": (16, 32)})


def _one_error_line(result):
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("flowmap: error:")]
  assert len(errors) == 1, result.stderr[-2000:]
  return errors[0]


def test_an_unknown_key_is_named_alone_with_an_explicit_config(tmp_path):
  line = _one_error_line(run_main(["--config", "configs/demo.py", "--workdir", str(tmp_path),
                                   "--config.eval.no_such_key=1", "--config.train.steps=5"]))
  assert "unknown config key 'no_such_key' in --config.eval.no_such_key=1;" in line
  assert "train.steps" not in line


def test_a_mesh_that_does_not_cover_the_devices_is_one_line(tmp_path):
  line = _one_error_line(run_main(
      ["--workdir", str(tmp_path), "--config.mesh.fsdp=3"],
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
  assert "mesh.data=-1 x mesh.fsdp=3 does not cover the 8 devices" in line


def test_a_partial_multi_process_start_is_one_line(tmp_path):
  line = _one_error_line(run_main(["--workdir", str(tmp_path), "--num_processes=2"]))
  assert "multi-process start needs all of --coordinator_address" in line


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and f not in ("__init__.py", "default.py")))   # default: the base
def test_every_shipped_config_validates_and_builds_its_model(name):
  """Each config file a user can pass is valid as shipped and, where it names shapes, gives
  a model with a per-position path for its layout (aligned conditioning and the prior)."""
  import importlib
  from flowmap import workdir as workdir_lib
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  workdir_lib.validate_config(c)
  if c.data.get("source_shape") and c.data.get("target_shape") and name != "bench":
    # (bench matches the PyTorch peer's architecture: no per-position paths)
    cfg = workdir_lib.model_config(c, c.data.source_shape, c.data.target_shape)
    assert cfg.aligned_conditioning and cfg.prior
    assert cfg.source_shape == tuple(c.data.source_shape)

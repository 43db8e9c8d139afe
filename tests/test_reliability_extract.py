"""Extraction faults and security: a SIGKILL inside a shard, full and unwritable disks,
remote model code, pickles, and dataset keys that look like paths.

Subprocess-driven where the behaviour is about the process (a real ``kill -9``, exit codes,
code that must not run); the tiny CLIP and EVA models and the inputs of extract_fixtures.
"""

import ast
import errno
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np   # noqa: E402
import pytest        # noqa: E402

from flowmap import data as data_lib          # noqa: E402
from flowmap import encoders as encoders_lib  # noqa: E402
from flowmap import extract                   # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import extract_fixtures as fx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "extract_features.py")
ERROR_PREFIX = "extract_features.py: error: "
BIG_IMAGES = 16          # images in the tar the killed run is stopped inside
NUM_SHARDS = 4           # the three fixture tars, then the big one
BIG_INDEX = 3


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("reliability_extract"))
  paths = fx.build_inputs(os.path.join(root, "in"))
  big = os.path.join(root, "in", "big", "big.tar")
  os.makedirs(os.path.dirname(big))
  members = []
  for i in range(BIG_IMAGES):
    members += [(f"b{i:03d}.jpg", fx.encoded(fx.picture(500 + i), "JPEG")),
                (f"b{i:03d}.txt", fx.caption(f"big {i}"))]
  fx.write_tar(big, members)
  paths["big"] = big
  paths["clip"] = fx.build_clip(os.path.join(root, "clip"))
  paths["eva"] = fx.build_eva(os.path.join(root, "eva"))
  paths["root"] = root
  return paths


def encoder_flags(world):
  return [f"clip=hf:{world['clip']}", f"clip_pooled=hf:{world['clip']},tokens=pooled",
          f"eva=timm:local-dir:{world['eva']}"]


def config(world, out, **overrides):
  settings = dict(inputs=[world["tar_braces"], world["big"]], encoders=encoder_flags(world),
                  out=out, holdout_fraction=0.3, batch_size=2, progress=False)
  settings.update(overrides)
  return extract.ExtractConfig(**settings)


def cli_args(world, out):
  """The command line equivalent of ``config(world, out)``."""
  args = [sys.executable, SCRIPT, "--input", world["tar_braces"], "--input", world["big"],
          "--out", out, "--holdout_fraction", "0.3", "--batch_size", "2", "--noprogress"]
  for spec in encoder_flags(world):
    args += ["--encoder", spec]
  return args


def cli_env(**extra):
  return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
              TF_CPP_MIN_LOG_LEVEL="2", **extra)


@pytest.fixture(scope="module")
def reference(world):
  """An uninterrupted run of the four input shards."""
  out = os.path.join(world["root"], "reference")
  assert extract.run(config(world, out)).manifest is not None
  return out


def tree_bytes(directory):
  files = {}
  for dirpath, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def assert_same_files(out, reference):
  got, want = tree_bytes(out), tree_bytes(reference)
  assert sorted(got) == sorted(want)
  differ = [name for name in want if got[name] != want[name]]
  assert not differ, f"files differ from the uninterrupted run: {differ}"


def final_shards(out):
  return sorted(n for n in os.listdir(out)
                if n.startswith(data_lib.DATASET_NAME) and not n.endswith(".incomplete"))


def assert_no_partial_dataset(out, reference, missing_index):
  """Only finished shards carry a final name, each byte-identical to the uninterrupted
  run's; the shard being written when the run stopped has none; no metadata claims a
  dataset."""
  ref = tree_bytes(reference)
  for name in final_shards(out):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read() == ref[name], f"{name} is visible but not complete"
  for split in ("train", "validation"):
    assert data_lib.shard_name(split, missing_index, NUM_SHARDS) not in os.listdir(out)
  for name in ("dataset_info.json", "stats.json", "manifest.json"):
    assert not os.path.exists(os.path.join(out, name)), name
  assert not data_lib.is_complete(out)


def error_lines(stderr):
  lines = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
  assert len(lines) == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory):
  """Whether this process may mount a tmpfs in a private mount namespace (unshare -m): the
  mount is invisible to every other process and goes away with the command."""
  if shutil.which("unshare") is None:
    return False
  where = tmp_path_factory.mktemp("mount_probe")
  done = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$1"',
                         "sh", str(where)], capture_output=True, timeout=30)
  return done.returncode == 0


def in_tmpfs(command, mount_point, copy_to, options):
  """``command`` with ``mount_point`` a fresh tmpfs (``options``) in a private mount
  namespace; what the command left there is copied to ``copy_to`` before it vanishes."""
  script = ('opts=$1; mp=$2; copy=$3; shift 3; mount -t tmpfs -o "$opts" tmpfs "$mp" || '
            'exit 99; "$@"; rc=$?; cp -a "$mp/." "$copy/"; exit $rc')
  os.makedirs(copy_to, exist_ok=True)
  return ["unshare", "-m", "sh", "-c", script, "sh", options, str(mount_point), str(copy_to),
          *command]


# ----------------------------------------------------------------------------- kill -9

def test_sigkill_inside_a_shard_then_rerun_gives_identical_files(world, reference, tmp_path):
  """A real ``kill -9`` of extract_features.py while it is writing a shard. The big tar is
  served through a FIFO that is fed half of it and then held open, so the process is
  guaranteed to be inside that shard (its temporary files exist, more input is awaited)
  when it is killed. Nothing partial carries a final name; running the same extraction
  again gives the same bytes, file for file, as an uninterrupted run."""
  out = str(tmp_path / "out")
  big = world["big"]
  with open(big, "rb") as f:
    payload = f.read()
  os.replace(big, big + ".real")
  os.mkfifo(big)
  release = threading.Event()

  def feed():
    try:
      with open(big, "wb") as pipe:   # blocks until the extraction opens the tar
        pipe.write(payload[:len(payload) // 2])
        pipe.flush()
        release.wait(300)
    except (BrokenPipeError, OSError):
      pass

  feeder = threading.Thread(target=feed, daemon=True)
  feeder.start()
  proc = subprocess.Popen(cli_args(world, out), cwd=ROOT, env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  temporary = [os.path.join(out, data_lib.shard_name(s, BIG_INDEX, NUM_SHARDS) + ".incomplete")
               for s in ("train", "validation")]
  try:
    deadline = time.time() + 240
    while not all(os.path.exists(p) for p in temporary):
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, "the big shard never started"
      time.sleep(0.05)
    time.sleep(0.5)        # let it decode, encode and write what it was fed
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
    release.set()
    try:                   # a feeder still waiting for a reader to open the FIFO: one comes
      os.close(os.open(big, os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
      pass
    feeder.join(30)
    os.remove(big)
    os.replace(big + ".real", big)

  # killed inside the shard: its temporary files are there, its final names are not
  assert all(os.path.exists(p) for p in temporary)
  assert_no_partial_dataset(out, reference, BIG_INDEX)
  assert len(final_shards(out)) >= 3    # the three tars before it were finished and kept

  # The same run again (in this process, to save a start-up: the shards the killed process
  # wrote are compared with ones written here, so process-dependent bytes would show).
  summary = extract.run(config(world, out))
  assert summary.done_before == BIG_INDEX
  assert_same_files(out, reference)


# ----------------------------------------------------------------------------- full disk

def test_full_disk_discards_the_shard_in_progress_and_a_rerun_completes(world, reference,
                                                                         tmp_path,
                                                                         monkeypatch):
  """ENOSPC from the writer in the middle of the big shard: one OutputError saying so, the
  temporary shard removed, the finished shards kept; once there is space the same run
  completes to the same bytes as an uninterrupted one."""
  out = str(tmp_path / "out")
  real_add = data_lib.ShardWriter.add
  added = []

  def add_until_full(self, key, caption, features):
    if self.index == BIG_INDEX:
      added.append(key)
      if len(added) == 3:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.tmp_path)
    return real_add(self, key, caption, features)

  monkeypatch.setattr(data_lib.ShardWriter, "add", add_until_full)
  with pytest.raises(extract.OutputError) as failure:
    extract.run(config(world, out))
  message = str(failure.value)
  assert "\n" not in message
  assert message.startswith(f"cannot write to --out {out}: No space left on device")
  assert "run the same command again" in message
  leftovers = [n for n in tree_bytes(out) if n.endswith((".incomplete", ".tmp"))]
  assert not leftovers, leftovers
  assert_no_partial_dataset(out, reference, BIG_INDEX)
  assert len(final_shards(out)) == 2 * BIG_INDEX   # shards 0-2 of both splits

  monkeypatch.setattr(data_lib.ShardWriter, "add", real_add)
  summary = extract.run(config(world, out))
  assert summary.done_before == BIG_INDEX
  assert_same_files(out, reference)


@pytest.mark.slow   # one more full command-line run; the ENOSPC path itself is tested above
def test_a_real_full_disk_is_one_line_and_exit_2(world, reference, tmp_path, private_mounts):
  """The command line on a real, tiny tmpfs (ENOSPC from TensorFlow's own writer): exit
  code 2, one error line, and what it leaves holds finished shards only."""
  if not private_mounts:
    pytest.skip("cannot mount a tmpfs in a private mount namespace here")
  mount_point, copy = tmp_path / "mnt", tmp_path / "left"
  mount_point.mkdir()
  out = os.path.join(str(mount_point), "feats")
  # Room for the run record and a few shards, not for all of them.
  done = subprocess.run(in_tmpfs(cli_args(world, out), mount_point, copy, "size=40k"),
                        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  line = error_lines(done.stderr)
  assert line.startswith(f"{ERROR_PREFIX}cannot write to --out {out}: No space left on device")
  assert "run the same command again" in line
  left = str(copy / "feats")
  assert not [n for n in tree_bytes(left) if n.endswith(".incomplete")]
  ref = tree_bytes(reference)
  for name in final_shards(left):
    with open(os.path.join(left, name), "rb") as f:
      assert f.read() == ref[name], f"{name} is visible but not complete"
  assert not data_lib.is_complete(left)


# ----------------------------------------------------------------------------- unwritable

@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_is_refused_before_any_work(world, tmp_path, monkeypatch, where):
  """Root ignores permission bits, so these are places nobody can write: a path below a
  regular file, and /proc. The encoders are never loaded and nothing is created."""
  if where == "under_a_file":
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = str(blocker / "feats")
  else:
    if not os.path.isdir("/proc/self"):
      pytest.skip("no /proc")
    out = "/proc/flowmap-reliability-test/feats"

  def must_not_load(*args, **kwargs):
    raise AssertionError("encoders loaded for an output that cannot be written")

  monkeypatch.setattr(encoders_lib, "load_encoders", must_not_load)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(extract.OutputError, match=r"^cannot write to --out "):
    extract.run(config(world, out))
  assert sorted(os.listdir(tmp_path)) == before
  assert not os.path.exists(out)


def test_read_only_output_is_one_line_and_exit_2(world, tmp_path, private_mounts):
  """The command line on a read-only file system (a read-only tmpfs in a private mount
  namespace; without one, a path below a regular file)."""
  if private_mounts:
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    out = os.path.join(str(mount_point), "feats")
    command = in_tmpfs(cli_args(world, out), mount_point, tmp_path / "left", "ro,size=16k")
    reason = "Read-only file system"
  else:
    (tmp_path / "a_file").write_text("")
    out = str(tmp_path / "a_file" / "feats")
    command = cli_args(world, out)
    reason = "is not a folder"
  done = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  line = error_lines(done.stderr)
  assert line.startswith(f"{ERROR_PREFIX}cannot write to --out {out}: ") and reason in line
  lines = [l for l in done.stderr.splitlines() if l.strip()]
  assert lines == [line], done.stderr     # refused before any work: nothing else was said
  if private_mounts:
    assert not os.listdir(tmp_path / "left")


# ----------------------------------------------------------------------------- remote code

def evil_checkpoint(directory, marker):
  """An hf: folder whose config names model code of its own; importing that code writes
  ``marker``."""
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "flowmap_evil",
               "auto_map": {"AutoConfig": "evil_code.EvilConfig",
                            "AutoModel": "evil_code.EvilModel"}}, f)
  with open(os.path.join(directory, "evil_code.py"), "w") as f:
    f.write(f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import PretrainedConfig\n\n\n"
            "class EvilConfig(PretrainedConfig):\n"
            "  model_type = 'flowmap_evil'\n")
  return directory


def test_remote_code_runs_only_with_trust_remote_code(world, tmp_path):
  """Without --trust_remote_code: exit 2, one line naming the flag, the code never ran and
  nothing was written. With it (the control, proving the checkpoint's code would run), the
  marker appears."""
  refused_marker, control_marker = tmp_path / "refused_ran", tmp_path / "control_ran"
  refused_dir = evil_checkpoint(str(tmp_path / "refused"), refused_marker)
  control_dir = evil_checkpoint(str(tmp_path / "control"), control_marker)
  env = cli_env(HF_MODULES_CACHE=str(tmp_path / "hf_modules"))

  def command(checkpoint, out, *extra):
    return [sys.executable, SCRIPT, "--input", world["folder"], "--encoder",
            f"x=hf:{checkpoint}", "--out", str(out), *extra]

  refused = subprocess.Popen(command(refused_dir, tmp_path / "o1"), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  control = subprocess.Popen(command(control_dir, tmp_path / "o2", "--trust_remote_code"),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _, refused_err = refused.communicate(timeout=300)
  _, control_err = control.communicate(timeout=300)
  assert refused.returncode == 2, refused_err[-3000:]
  lines = [l for l in refused_err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), refused_err
  assert "ships its own model code" in lines[0] and "--trust_remote_code" in lines[0]
  assert not refused_marker.exists(), "remote code ran without --trust_remote_code"
  assert not (tmp_path / "o1").exists()
  assert control_marker.exists(), control_err[-3000:]   # the control: the code does run
  assert control.returncode == 2                        # (then it has no image processor)


# ----------------------------------------------------------------------------- pickles

def malicious_pickle(marker) -> bytes:
  """A protocol-0 pickle whose loading calls open(marker, 'w')."""
  return f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()


def test_pickled_hf_weights_are_refused_without_unpickling(world, tmp_path):
  import torch
  checkpoint = tmp_path / "clip_bin"
  shutil.copytree(world["clip"], checkpoint)
  os.remove(checkpoint / "model.safetensors")
  marker = tmp_path / "unpickled"
  (checkpoint / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
  spec = encoders_lib.EncoderSpec.parse(f"c=hf:{checkpoint}")
  with pytest.raises(encoders_lib.EncoderError, match=r"pickled \(pytorch_model\.bin\).*"
                                                       r"safetensors weights only"):
    encoders_lib.load_encoders([spec], torch.device("cpu"))
  assert not marker.exists()


def test_pickled_timm_weights_are_refused_without_unpickling(world, tmp_path):
  """timm prefers pytorch_model.bin to open_clip_model.safetensors in a local folder; the
  load refuses to unpickle it rather than trusting ``weights_only``."""
  import torch
  checkpoint = tmp_path / "eva_bin"
  shutil.copytree(world["eva"], checkpoint)
  os.replace(checkpoint / "model.safetensors", checkpoint / "open_clip_model.safetensors")
  marker = tmp_path / "unpickled"
  (checkpoint / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
  spec = encoders_lib.EncoderSpec.parse(f"e=timm:local-dir:{checkpoint}")
  with pytest.raises(encoders_lib.EncoderError, match=r"pickled \(pytorch_model\.bin\)"):
    encoders_lib.load_encoders([spec], torch.device("cpu"))
  assert not marker.exists()
  assert torch.load is not None and torch.load.__name__ == "load"   # restored afterwards


def project_sources():
  files = [os.path.join(ROOT, "main.py"), os.path.join(ROOT, "extract_features.py")]
  files += sorted(glob.glob(os.path.join(ROOT, "flowmap", "**", "*.py"), recursive=True))
  files += sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  return files


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal"}
PICKLE_NAMES = PICKLE_MODULES | {"Pickler", "Unpickler", "read_pickle", "to_pickle"}
# from_pretrained of these only reads JSON; every other from_pretrained loads weights.
NO_WEIGHTS = ("Config", "Processor", "ImageProcessor", "Tokenizer", "FeatureExtractor")


def _keyword(call, name):
  return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node):
  return isinstance(node, ast.Constant) and node.value is True


def test_nothing_is_pickled_anywhere_in_the_project():
  """A scan of the project's code (comments and strings left out): no pickle-family module,
  no torch.load without weights_only=True, no np.load(allow_pickle=True), no weights loaded
  by transformers without use_safetensors=True."""
  problems = []
  for path in project_sources():
    rel = os.path.relpath(path, ROOT)
    with open(path, "rb") as f:
      source = f.read()
    code_tokens = [t.string for t in tokenize.tokenize(io.BytesIO(source).readline)
                   if t.type == tokenize.NAME]
    problems += [f"{rel}: {word}" for word in code_tokens if word in PICKLE_NAMES]
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        problems += [f"{rel}:{node.lineno}: imports {n}" for n in names
                     if n.split(".")[0] in PICKLE_MODULES]
      if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        continue
      attr, owner = node.func.attr, ast.unparse(node.func.value)
      if attr == "load" and owner.split(".")[-1] in ("torch", "serialization"):
        if not _is_true(_keyword(node, "weights_only")):
          problems.append(f"{rel}:{node.lineno}: {owner}.load without weights_only=True")
      if _keyword(node, "allow_pickle") is not None and \
          not (isinstance(_keyword(node, "allow_pickle"), ast.Constant) and
               _keyword(node, "allow_pickle").value is False):
        problems.append(f"{rel}:{node.lineno}: allow_pickle")
      if attr == "from_pretrained" and not owner.endswith(NO_WEIGHTS):
        if not _is_true(_keyword(node, "use_safetensors")):
          problems.append(f"{rel}:{node.lineno}: {owner}.from_pretrained without "
                          "use_safetensors=True")
  assert not problems, problems
  # the scan sees what it is looking for
  encoders_src = open(os.path.join(ROOT, "flowmap", "encoders.py")).read()
  assert encoders_src.count("use_safetensors=True") >= 2


# ----------------------------------------------------------------------------- keys as paths

NASTY_KEYS = ["../../etc/x", "/abs/y", "new\nline", "k\x00" + "z" * 120, "%s%n",
              "manifest", "parts/extract/run-train"]


def snapshot(root, skip):
  """Every path under ``root`` except those under ``skip``."""
  found = set()
  for dirpath, dirnames, names in os.walk(root):
    if os.path.abspath(dirpath).startswith(os.path.abspath(skip)):
      continue
    found.update(os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + names)
  return found


OUTPUT_NAME = re.compile(
    r"^(dataset_info\.json|features\.json|stats\.json|manifest\.json|map\.json|parts|"
    r"parts/extract|parts/extract/run-train\.json|"
    r"parts/(extract/)?train-\d{5}-of-\d{5}\.json|"
    r"flowmap_features-train\.tfrecord-\d{5}-of-\d{5})$")


def test_dataset_keys_never_become_paths_in_extraction(world, tmp_path):
  """Tar members and folder files named like paths (parent references, absolute, newline,
  NUL, a shard's own name): extraction writes only its own file names, inside --out, and
  stores the keys verbatim, as data."""
  tar = tmp_path / "in" / "nasty.tar"
  tar.parent.mkdir()
  with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:   # PAX: names may hold NUL
    for i, key in enumerate(NASTY_KEYS):
      for ext, payload in (("jpg", fx.encoded(fx.picture(700 + i), "JPEG")),
                           ("txt", f"caption of {key}".encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
  folder = tmp_path / "in" / "folder"
  (folder / "sub").mkdir(parents=True)
  fx.picture(800).save(folder / "sub" / "new\nline.png")
  fx.picture(801).save(folder / "..odd.png")              # hidden: not an image of the set
  out = tmp_path / "a" / "b" / "out"                       # ../../etc/x would be tmp/a/etc/x
  before = snapshot(tmp_path, out)
  summary = extract.run(extract.ExtractConfig(
      inputs=[str(tar), str(folder)], encoders=[f"clip=hf:{world['clip']}"], out=str(out),
      batch_size=4, progress=False))
  assert summary.manifest is not None
  assert snapshot(tmp_path, out) == before | {"a", "a/b", "a/b/out"}
  written = {os.path.relpath(os.path.join(d, n), out)
             for d, dirs, names in os.walk(out) for n in dirs + names}
  assert all(OUTPUT_NAME.match(n) for n in written), sorted(written)
  rows = data_lib.load_features(str(out), "train")
  assert sorted(rows["key"].tolist()) == sorted(NASTY_KEYS + ["sub/new\nline"])
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(str(out))
  captions = {ex["key"].decode(): ex["caption"].decode()
              for ex in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False))}
  for key in NASTY_KEYS:
    assert captions[key] == f"caption of {key}"


def test_dataset_keys_never_become_paths_in_map_mode(tmp_path, monkeypatch):
  """main.py --mode map copies each key and caption into the new dataset as data; its files
  are named by split and shard index only. (The trained run is a stand-in: what is under
  test is where the export writes.)"""
  from configs import default
  from flowmap import export as export_lib
  from flowmap import mapper as mapper_lib
  keys = [k for k in NASTY_KEYS] + ["mid\x00nul"]
  rng = np.random.default_rng(0)
  examples = [{"key": k, "caption": f"caption\nof {k}",
               "features": {"src": rng.normal(size=(4, 8)), "tgt": rng.normal(size=(4, 8))}}
              for k in keys]
  data_in = tmp_path / "data_in"
  data_lib.write_dataset(str(data_in), {"train": examples},
                         {"src": (4, 8), "tgt": (4, 8)}, num_shards=2)

  class StandIn:
    source, target = "src", "tgt"
    source_shape = target_shape = (4, 8)
    step, ema = 1, True

    def check_guidance(self, guidance):
      pass

    _check_guidance = check_guidance

    def map(self, x, seed=0, first_row=0, batch_size=0, mode="sample"):
      return np.asarray(x, np.float32) * 2.0

  monkeypatch.setattr(mapper_lib.Mapper, "from_workdir", classmethod(
      lambda cls, workdir, ema=True: StandIn()))
  c = default.get_config()
  out = tmp_path / "x" / "y" / "mapped"
  c.map.input, c.map.output = str(data_in), str(out)
  before = snapshot(tmp_path, out)
  result = export_lib.map_dataset(c, str(tmp_path / "run"))
  assert result["map/rows"] == len(keys)
  assert snapshot(tmp_path, out) == before | {"x", "x/y", "x/y/mapped"}
  written = {os.path.relpath(os.path.join(d, n), out)
             for d, dirs, names in os.walk(out) for n in dirs + names}
  assert all(OUTPUT_NAME.match(n) for n in written), sorted(written)
  got = data_lib.load_features(str(out), "train")
  assert sorted(got["key"].tolist()) == sorted(keys)
  np.testing.assert_allclose(
      got["tgt_mapped"][np.argsort(got["key"])],
      2 * np.stack([ex["features"]["src"] for ex in examples]).astype(np.float16)
      .astype(np.float32)[np.argsort(keys)], rtol=1e-3)

"""Feature extraction: tiny real encoders (a transformers CLIP tower and a timm EVA02),
webdataset shards and a folder holding every kind of bad item, all offline."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np   # noqa: E402
import pytest        # noqa: E402

from flowmap import data as data_lib       # noqa: E402
from flowmap import encoders as encoders_lib  # noqa: E402
from flowmap import extract                # noqa: E402
from flowmap import preprocessing          # noqa: E402
from flowmap.extract import inputs, pipeline  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import extract_fixtures as fx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("extract"))
  paths = fx.build_inputs(os.path.join(root, "in"))
  paths["clip"] = fx.build_clip(os.path.join(root, "clip"))
  paths["eva"] = fx.build_eva(os.path.join(root, "eva"))
  paths["root"] = root
  return paths


def encoder_flags(world):
  return [f"clip=hf:{world['clip']}", f"clip_pooled=hf:{world['clip']},tokens=pooled",
          f"eva=timm:local-dir:{world['eva']}"]


def config(world, out, **overrides):
  settings = dict(inputs=[world["tar_braces"], world["folder"]], encoders=encoder_flags(world),
                  out=out, holdout_fraction=0.3, batch_size=3, decode_workers=2,
                  progress=False)
  settings.update(overrides)
  return extract.ExtractConfig(**settings)


@pytest.fixture(scope="module")
def extracted(world):
  out = os.path.join(world["root"], "out")
  summary = extract.run(config(world, out))
  assert summary.manifest is not None
  return out


def tree_bytes(directory):
  files = {}
  for dirpath, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def read_split(out, split):
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(out)
  rows = {}
  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    rows[ex["key"].decode()] = ex
  return rows


# ----------------------------------------------------------------------------- units

def test_timm_imports_after_flowmap_encoders():
  """The CUDA torchvision wheel next to a CPU torch cannot load its ops; flowmap.encoders
  makes its import (hence timm's) work anyway. The command line test below checks the same
  in a fresh process."""
  import timm
  import torchvision.transforms  # noqa: F401
  assert "eva02_large_patch14_clip_224" in timm.list_models("eva02*")


def test_encoder_spec_parsing():
  s = encoders_lib.EncoderSpec.parse("clip=hf:openai/clip-vit-large-patch14")
  assert (s.name, s.source, s.layer, s.tokens, s.keep_cls) == (
      "clip", "hf:openai/clip-vit-large-patch14", -1, "patch", False)
  s = encoders_lib.EncoderSpec.parse(
      "e=hf:/data/a,b/EVA-CLIP-8B,processor=openai/clip-vit-large-patch14,layer=-2,cls=keep")
  assert (s.source, s.layer, s.keep_cls, s.processor) == (
      "hf:/data/a,b/EVA-CLIP-8B", -2, True, "openai/clip-vit-large-patch14")
  s = encoders_lib.EncoderSpec.parse("eva=timm:local-dir:/m/eva,tokens=pooled")
  assert (s.source, s.tokens) == ("timm:local-dir:/m/eva", "pooled")
  for bad in ["clip", "key=hf:x", "1x=hf:x", "c=torch:x", "c=hf:x,tokens=all", "c=hf:x,layer=a",
              "c=timm:x,processor=y"]:
    with pytest.raises(encoders_lib.EncoderError):
      encoders_lib.EncoderSpec.parse(bad)


def test_brace_and_glob_inputs(world, tmp_path):
  assert extract.expand_braces("s/{00008..00011}.tar") == [
      "s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
  assert extract.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
  shards = extract.resolve_inputs([world["tar_glob"], world["folder"]], images_per_shard=3)
  assert [s.kind for s in shards] == ["tar"] * 3 + ["folder"] * 2
  assert [len(s.files) for s in shards[3:]] == [3, 1]
  assert extract.resolve_inputs([world["tar_braces"]], max_shards=2)[1].label.endswith("00001.tar")
  for missing in [str(tmp_path / "nothing-*.tar"), str(tmp_path / "{0..1}.tar")]:
    with pytest.raises(extract.ExtractError, match="matches nothing|does not exist"):
      extract.resolve_inputs([missing])


@pytest.mark.parametrize("make,expected", [
    (lambda: fx.encoded(fx.picture(0).convert("CMYK"), "JPEG"), "CMYK"),
    (lambda: fx.encoded(fx.picture(0).convert("L"), "PNG"), "L"),
    (lambda: fx.encoded(fx.palette_with_transparency(0), "PNG"), "P"),
    (lambda: fx.encoded(fx.rgba(0), "PNG"), "RGBA"),
    (lambda: fx.encoded(fx.grayscale16(0), "PNG"), "I;16"),
    (lambda: fx.encoded(fx.picture(0), "WEBP"), None),
])
def test_unusual_modes_become_rgb(make, expected):
  image, converted = extract.decode_image(make(), min_size=16)
  assert image.mode == "RGB" and converted == expected
  if expected == "I;16":   # rescaled to 8 bits, not clipped to white
    np.testing.assert_allclose(np.asarray(image)[..., 0],
                               np.asarray(fx.picture(0).convert("L")), atol=1)
  if expected == "RGBA":   # composited on white
    assert np.asarray(image)[:, :5].mean() > np.asarray(fx.picture(0))[:, :5].mean()


@pytest.mark.parametrize("data,reason", [
    (fx.truncated_jpeg(0), "corrupt_image"),
    (b"not an image at all", "corrupt_image"),
    (fx.encoded(fx.picture(0).resize((1, 1)), "PNG"), "too_small"),
])
def test_bad_images_are_skipped_with_reason(data, reason):
  item = extract.prepare(extract.Sample(key="k", image=data), [], min_size=16)
  assert item.skip == reason


@pytest.mark.parametrize("size", [(47, 33), (33, 47), (64, 64), (32, 40)])
def test_preprocessing_matches_the_reference_pipelines(world, size):
  """Our uint8 geometry + device normalisation equals transformers' PIL image processor and
  timm's evaluation transform (odd sizes exercise the two crop roundings)."""
  import timm
  import torch
  from transformers import AutoImageProcessor
  image = fx.picture(7, *size)
  processor = AutoImageProcessor.from_pretrained(world["clip"], backend="pil")
  ours = preprocessing.preprocess_from_hf_processor(processor)
  expected = processor(image, return_tensors="np")["pixel_values"]
  got = ours.normalize(torch.from_numpy(ours.geometry.apply(image)[None])).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)

  model = timm.create_model(f"local-dir:{world['eva']}", pretrained=True)
  data_config = timm.data.resolve_model_data_config(model)
  transform = timm.data.create_transform(**data_config, is_training=False)
  ours = preprocessing.preprocess_from_timm_config(data_config)
  got = ours.normalize(torch.from_numpy(ours.geometry.apply(image)[None])).numpy()
  np.testing.assert_allclose(got, transform(image)[None].numpy(), atol=1e-5)


def test_full_clip_checkpoint_loads_its_vision_tower_and_projection(tmp_path):
  """openai/clip-vit-large-patch14 is a whole CLIPModel whose projection width sits at the
  top of its config; only the vision side is loaded, and it matches CLIPModel's own."""
  import torch
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
  torch.manual_seed(0)
  config = CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=24)
  model = CLIPModel(config).eval()
  model.save_pretrained(tmp_path)
  CLIPImageProcessor(size={"shortest_edge": 32},
                     crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
  specs = [encoders_lib.EncoderSpec.parse(f"c=hf:{tmp_path}"),
           encoders_lib.EncoderSpec.parse(f"p=hf:{tmp_path},tokens=pooled")]
  encoders = encoders_lib.load_encoders(specs, torch.device("cpu"))
  assert encoders.shapes == {"c": (16, 32), "p": (1, 24)}
  assert len(encoders.networks) == 1
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  out = encoders.encode([images])
  pixels = next(iter(encoders.networks.values())).preprocess.normalize(torch.from_numpy(images))
  with torch.no_grad():
    embeds = model.get_image_features(pixel_values=pixels)
    embeds = getattr(embeds, "pooler_output", embeds)   # a tensor before transformers 5
    hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
  np.testing.assert_allclose(out["p"][:, 0], embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(out["c"], hidden[-1][:, 1:].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- extraction

def reference_features(world, keys_to_images):
  """A direct forward pass of each saved model on each image, preprocessed by the model's
  own library (transformers' processor, timm's transform)."""
  import timm
  import torch
  from transformers import AutoImageProcessor, CLIPVisionModelWithProjection
  clip = CLIPVisionModelWithProjection.from_pretrained(world["clip"]).eval()
  processor = AutoImageProcessor.from_pretrained(world["clip"], backend="pil")
  eva = timm.create_model(f"local-dir:{world['eva']}", pretrained=True).eval()
  transform = timm.data.create_transform(**timm.data.resolve_model_data_config(eva))
  out = {}
  with torch.no_grad():
    for key, image in keys_to_images.items():
      pixels = torch.from_numpy(processor(image, return_tensors="np")["pixel_values"])
      res = clip(pixel_values=pixels, output_hidden_states=True)
      x = transform(image)[None]
      tokens, rope = eva._pos_embed(eva.patch_embed(x))
      tokens = eva.norm_pre(tokens)
      for block in eva.blocks:              # the last block's output, before the final norm
        tokens = block(tokens, rope=rope)
      out[key] = {"clip": res.hidden_states[-1][0, 1:].numpy(),
                  "clip_pooled": res.image_embeds.numpy(),
                  "eva": tokens[0, eva.num_prefix_tokens:].numpy()}
  return out


def source_images(world):
  """The decoded RGB image of every stored key, read back from the inputs."""
  import tarfile
  images = {}
  for name in sorted(os.listdir(world["shards"])):
    try:
      with tarfile.open(os.path.join(world["shards"], name), "r|*") as tar:
        for member in tar:
          key, ext = inputs._split_member(member.name)
          if ext in extract.IMAGE_EXTENSIONS:
            images[key] = tar.extractfile(member).read()
    except tarfile.TarError:
      pass
  for rel in extract.list_images(world["folder"]):
    with open(os.path.join(world["folder"], rel), "rb") as f:
      images[rel.rsplit(".", 1)[0]] = f.read()
  decoded = {}
  for key, data in images.items():
    try:
      decoded[key] = extract.decode_image(data, 16)[0]
    except extract.SkipItem:
      pass
  return decoded


def test_stored_features_equal_a_direct_forward_pass(world, extracted):
  rows = {**read_split(extracted, "train"), **read_split(extracted, "validation")}
  assert sorted(rows) == fx.EXPECTED["written_keys"]
  images = source_images(world)
  reference = reference_features(world, {k: images[k] for k in rows})
  for key, row in rows.items():
    for name in ("clip", "clip_pooled", "eva"):
      assert row[name].dtype == np.float16
      np.testing.assert_allclose(row[name].astype(np.float32), reference[key][name],
                                 rtol=2e-3, atol=2e-3, err_msg=f"{key} {name}")


def test_tfds_reads_the_dataset_with_keys_captions_and_holdout(extracted):
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(extracted)
  assert set(builder.info.splits) == {"train", "validation"}
  train, validation = read_split(extracted, "train"), read_split(extracted, "validation")
  assert builder.info.splits["train"].num_examples == len(train)
  for key in train:
    assert not extract.in_holdout(key, 0.3)
  for key in validation:
    assert extract.in_holdout(key, 0.3)
  rows = {**train, **validation}
  assert rows["a/s0000"]["caption"].decode() == "a red thing"
  assert rows["a/s0001"]["caption"].decode() == "json caption"
  assert rows["x/f0"]["caption"].decode() == "folder caption"
  assert rows["s0103"]["caption"].decode() == ""
  assert rows["a/s0000"]["clip"].shape == (16, 32)
  assert rows["a/s0000"]["clip_pooled"].shape == (1, 16)
  feats = data_lib.load_features(extracted, "train", names=["eva"])
  assert feats["eva"].shape == (len(train), 16, 32)


def test_manifest_counts_every_skip_and_conversion(extracted):
  with open(os.path.join(extracted, "manifest.json")) as f:
    manifest = json.load(f)
  counts = manifest["counts"]
  assert counts["read"] == fx.EXPECTED["read"]
  assert counts["skipped"] == fx.EXPECTED["skipped"]
  assert counts["converted"] == fx.EXPECTED["converted"]
  assert counts["captions"] == fx.EXPECTED["captions"]
  assert sum(counts["written"].values()) == len(fx.EXPECTED["written_keys"])
  assert [e["name"] for e in manifest["encoders"]] == ["clip", "clip_pooled", "eva"]
  assert manifest["encoders"][2]["spec"].startswith("timm:local-dir:")
  assert manifest["encoders"][0]["layer"] == -1 and manifest["encoders"][0]["cls"] == "drop"
  assert len(manifest["inputs"]["train"]) == 4


def test_stats_are_float64_moments_of_the_stored_train_features(extracted):
  with open(os.path.join(extracted, "stats.json")) as f:
    stats = json.load(f)
  train = read_split(extracted, "train")
  for name in ("clip", "clip_pooled", "eva"):
    x = np.stack([r[name] for r in train.values()]).astype(np.float64)
    x = x.reshape(-1, x.shape[-1])
    entry = stats["features"][name]
    assert entry["count"] == len(train)
    np.testing.assert_allclose(entry["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(entry["std"], x.std(0, ddof=1), rtol=1e-9, atol=1e-12)


def test_interrupted_run_resumes_to_identical_files(world, extracted, tmp_path, monkeypatch):
  """Killed after its first shard (with a stale temporary file left behind), then run
  again: the same bytes as the uninterrupted run, decoded inline this time."""
  out = str(tmp_path / "out")
  real = pipeline.extract_shard
  calls = []

  class Killed(BaseException):
    pass

  def dies_on_second_shard(cfg, record, shard, index, *args, **kwargs):
    calls.append(index)
    if len(calls) == 2:
      raise Killed
    return real(cfg, record, shard, index, *args, **kwargs)

  monkeypatch.setattr(pipeline, "extract_shard", dies_on_second_shard)
  with pytest.raises(Killed):
    extract.run(config(world, out, decode_workers=0))
  monkeypatch.setattr(pipeline, "extract_shard", real)
  visible = [n for n in os.listdir(out) if n.startswith(data_lib.DATASET_NAME)]
  assert all("-00000-of-" in n for n in visible), visible
  assert not os.path.exists(os.path.join(out, "dataset_info.json"))
  stale = os.path.join(out, data_lib.shard_name("train", 1, 4) + ".incomplete")
  with open(stale, "wb") as f:
    f.write(b"partial")
  summary = extract.run(config(world, out, decode_workers=0))
  assert summary.done_before == 1
  assert tree_bytes(out) == tree_bytes(extracted)


def test_array_workers_split_shards_and_the_last_one_finalizes(world, extracted, tmp_path):
  out = str(tmp_path / "out")
  first = extract.run(config(world, out, num_workers=2, worker_index=1))
  assert (first.assigned, first.manifest) == (2, None)
  assert not os.path.exists(os.path.join(out, "stats.json"))
  second = extract.run(config(world, out, num_workers=2, worker_index=0))
  assert second.manifest is not None
  assert tree_bytes(out) == tree_bytes(extracted)


def test_a_separate_validation_run_joins_the_dataset(world, tmp_path):
  out = str(tmp_path / "out")
  extract.run(config(world, out, inputs=[world["tar_braces"]], holdout_fraction=0.0))
  extract.run(config(world, out, inputs=[world["folder"]], split="validation",
                     holdout_fraction=0.0))
  assert data_lib.split_size(out, "train") == 13
  assert data_lib.split_size(out, "validation") == 4
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["num_shards"] == {"train": 3, "validation": 1}
  assert manifest["counts"]["read"] == fx.EXPECTED["read"]


def test_output_folder_of_another_encoder_set_is_refused(world, extracted):
  other = config(world, extracted, encoders=[f"clip=hf:{world['clip']}"])
  with pytest.raises(extract.ExtractError, match="different encoder set"):
    extract.run(other)
  other_inputs = config(world, extracted, inputs=[world["tar_braces"]])
  with pytest.raises(extract.ExtractError, match="other inputs"):
    extract.run(other_inputs)


def test_encoder_that_cannot_load_is_one_config_error(world, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text("{not json")
  for spec, message in [(f"x=hf:{tmp_path / 'no-model'}", "no such directory"),
                        (f"x=hf:{broken}", "cannot load hf:"),
                        ("x=timm:not_a_model", "cannot load timm:not_a_model")]:
    with pytest.raises(extract.ExtractError, match=message):
      extract.run(config(world, str(tmp_path / "o"), encoders=[spec]))
  assert not (tmp_path / "o").exists()
  bad = config(world, str(tmp_path / "o"), encoders=[f"x=hf:{world['clip']},layer=7"])
  with pytest.raises(extract.ExtractError, match="out of range"):
    extract.run(bad)


def test_command_line_exits_2_with_one_line(world, tmp_path):
  """An encoder that cannot load: one line on stderr, exit code 2, nothing written. The
  fresh process also proves timm imports next to a torchvision without its ops."""
  out = tmp_path / "o"
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "extract_features.py"), "--input", world["folder"],
       "--encoder", f"clip=hf:{world['clip']}", "--encoder", "eva=timm:no_such_model",
       "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, done.stderr
  assert "cannot load timm:no_such_model" in lines[0]
  assert not out.exists()


def test_bad_flag_value_exits_2(capsys):
  import extract_features
  with pytest.raises(SystemExit) as exit_info:
    extract_features.parse_flags(["extract_features.py", "--batch_size=many"])
  assert exit_info.value.code == 2
  assert "--batch_size" in capsys.readouterr().err


def test_nonfinite_features_are_rejected_with_the_key_named(world, tmp_path, monkeypatch,
                                                           caplog):
  real = encoders_lib.Encoders.encode

  def poisoned(self, images):
    out = real(self, images)
    if len(images[0]) == 3:   # poison the first row of full batches
      out["eva"][0, 0, 0] = np.inf
    return out

  monkeypatch.setattr(encoders_lib.Encoders, "encode", poisoned)
  out = str(tmp_path / "out")
  summary = extract.run(config(world, out, inputs=[world["tar_braces"]], max_shards=1,
                               holdout_fraction=0.0))
  assert summary.manifest["counts"]["skipped"]["nonfinite_features"] == 1
  assert "a/s0000" in caplog.text and "non-finite" in caplog.text
  assert data_lib.split_size(out, "train") == 4


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """The tiny CLIP and EVA features have the same shape, so both directions compile the
  same programs: a persistent cache for this module saves the second compile (~30 s)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cache
  settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0.0}
  saved = {k: getattr(jax.config, k) for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
  cache.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  cache.reset_cache()


@pytest.mark.parametrize("source,target", [("eva", "clip"), ("clip", "eva")])
def test_training_runs_on_the_extracted_dataset(extracted, compilation_cache, tmp_path, source,
                                               target):
  from configs import default
  from flowmap import train
  c = default.get_config()
  c.data.dir, c.data.source, c.data.target = extracted, source, target
  c.model.size, c.model.dim, c.model.depth, c.model.heads = "tiny", 32, 1, 2
  c.train.steps, c.train.batch_size, c.train.warmup_steps = 3, 4, 1
  c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 3
  c.eval.num_images, c.eval.batch_size, c.eval.steps = 2, 2, 2
  c.model.prior_mlp_steps = 200   # the auto prior's choice, fitted briefly (8000: ~20 s)
  result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(result["eval/cosine_token"])


def test_workers_finishing_together_finalize_without_colliding(extracted, tmp_path):
  """Regression: every JSON went through one fixed temporary name, so workers finalizing
  (or writing the run record) at the same moment renamed each other's files away."""
  import shutil
  import threading
  out = str(tmp_path / "out")
  shutil.copytree(extracted, out)
  errors = []

  def finalize():
    try:
      for _ in range(5):
        assert extract.try_finalize(out) is not None
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=finalize) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert tree_bytes(out) == tree_bytes(extracted)

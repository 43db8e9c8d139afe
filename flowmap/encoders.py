"""Image encoders for feature extraction: Hugging Face and timm vision towers behind one
interface, each with the preprocessing its own checkpoint prescribes.

An encoder is named on the command line as ``NAME=SOURCE[,option=value...]``:

  clip=hf:openai/clip-vit-large-patch14             patch tokens of the last block (CLS dropped)
  clip_pooled=hf:openai/clip-vit-large-patch14,tokens=pooled   the projected image embedding
  eva=timm:eva02_large_patch14_clip_224.merged2b,layer=-2

Options: ``layer`` (-1, the default, is the last block's output before the final norm, the
features BLIP3-o and the earlier projects diffuse; -2 the penultimate; N > 0 after N blocks),
``tokens`` (``patch`` or ``pooled``), ``cls`` (``drop``, the default, or ``keep`` the prefix
tokens: CLS and any registers) and, for ``hf:`` checkpoints that ship no image processor
config (EVA-CLIP-8B), ``processor=<hub id or dir>`` naming one.

Encoders that name the same checkpoint share one loaded network and one forward pass. Each
network's preprocessing (flowmap.preprocessing) is read from its checkpoint: the geometric
part runs in the decoding workers, the arithmetic part on the device, here.

Loading never runs code from a checkpoint unless asked: weights are read from safetensors
only (a pickled ``.bin``/``.pth`` is refused, never unpickled, even with ``weights_only``),
and model code shipped with an ``hf:`` checkpoint runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from flowmap.preprocessing import (EncoderError, Preprocess, preprocess_from_hf_processor,
                                   preprocess_from_timm_config)


def _make_torchvision_importable() -> None:
  """Lets ``import torchvision`` (hence timm, and transformers' image processors) succeed
  when torchvision's compiled ops cannot load.

  The torchvision wheel that pip resolves next to a CPU-only torch is a CUDA build whose
  ``_C`` extension fails to load (missing CUDA libraries). torchvision guards all its
  import-time op registrations with ``_has_ops()`` except the fake (meta) kernels of ``nms``
  and ``qnms``, which it registers unconditionally, so the import dies with "operator
  torchvision::nms does not exist". Encoders never call torchvision ops; defining the two
  schemas (no kernels) lets that registration succeed, and any actual call of those ops
  still fails loudly. When the extension does load, it is loaded here exactly as
  torchvision would and nothing is defined.
  """
  if "torchvision" in sys.modules:
    return
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    return
  lib_dir = list(spec.submodule_search_locations)[0]
  finder = importlib.machinery.FileFinder(
      lib_dir, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
  extension = finder.find_spec("_C")
  if extension is not None:
    try:
      torch.ops.load_library(extension.origin)
      return
    except OSError:
      pass
  for op in ("nms", "qnms"):
    try:
      getattr(torch.ops.torchvision, op)
    except (AttributeError, RuntimeError):
      torch.library.define(f"torchvision::{op}",
                           "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_make_torchvision_importable()

TOKEN_KINDS = ("patch", "pooled")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_NAMES = ("key", "caption")
_OPTION_RE = re.compile(r",(layer|tokens|cls|processor)=([^,]*)$")


# ----------------------------------------------------------------------------- specs

@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """One stored feature: which network, which layer, which tokens."""
  name: str
  source: str                     # "hf:<id or dir>" or "timm:<name or local-dir:PATH>"
  layer: int = -1
  tokens: str = "patch"
  keep_cls: bool = False
  processor: Optional[str] = None

  @classmethod
  def parse(cls, text: str) -> "EncoderSpec":
    """``NAME=SOURCE[,layer=L][,tokens=patch|pooled][,cls=drop|keep][,processor=ID]``.

    Options are peeled off the end, so a path containing commas still works as long as
    no part of it looks like an option."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
      raise EncoderError(f"--encoder {text!r}: expected NAME=SOURCE, e.g. "
                         "clip=hf:openai/clip-vit-large-patch14")
    name = name.strip()
    if not _NAME_RE.match(name) or name in _RESERVED_NAMES:
      raise EncoderError(f"--encoder {text!r}: the name {name!r} must be an identifier other "
                         f"than {', '.join(_RESERVED_NAMES)}")
    options = {}
    while True:
      m = _OPTION_RE.search(rest)
      if not m:
        break
      if m.group(1) in options:
        raise EncoderError(f"--encoder {text!r}: option {m.group(1)} given twice")
      options[m.group(1)] = m.group(2)
      rest = rest[:m.start()]
    source = rest.strip()
    kind, sep, ref = source.partition(":")
    if kind not in ("hf", "timm") or not sep or not ref:
      raise EncoderError(f"--encoder {text!r}: the source must be hf:<hub id or dir> or "
                         "timm:<model name or local-dir:PATH>")
    try:
      layer = int(options.get("layer", "-1"))
    except ValueError:
      raise EncoderError(f"--encoder {text!r}: layer must be an integer") from None
    tokens = options.get("tokens", "patch")
    if tokens not in TOKEN_KINDS:
      raise EncoderError(f"--encoder {text!r}: tokens must be one of {TOKEN_KINDS}")
    cls_opt = options.get("cls", "drop")
    if cls_opt not in ("drop", "keep"):
      raise EncoderError(f"--encoder {text!r}: cls must be drop or keep")
    processor = options.get("processor") or None
    if processor and kind != "hf":
      raise EncoderError(f"--encoder {text!r}: processor= applies to hf: encoders only")
    return cls(name, source, layer, tokens, cls_opt == "keep", processor)

  def to_json(self) -> dict:
    return {"name": self.name, "spec": self.source, "layer": self.layer,
            "tokens": self.tokens, "cls": "keep" if self.keep_cls else "drop",
            "processor": self.processor}

  @property
  def network_key(self) -> tuple:
    return (self.source, self.processor)


def check_unique(specs: Sequence[EncoderSpec]) -> None:
  names = [s.name for s in specs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise EncoderError(f"encoder names must be unique; repeated: {', '.join(dupes)}")
  if not specs:
    raise EncoderError("no --encoder given")


# ----------------------------------------------------------------------------- networks

def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


class Network:
  """One loaded vision tower; returns the hidden states and pooled embedding its encoders
  ask for, from a single forward pass."""

  def __init__(self, source: str, module: torch.nn.Module, preprocess: Preprocess):
    self.source, self.module, self.preprocess = source, module, preprocess
    self.depth = 0
    self.num_prefix = 0

  def forward(self, pixels: torch.Tensor, layers: Sequence[int], pooled: bool):
    """-> ({layer: [B, prefix + patches, D]}, [B, E] or None)."""
    raise NotImplementedError

  def check_layer(self, spec: EncoderSpec) -> None:
    if not -self.depth <= spec.layer <= self.depth:
      raise EncoderError(f"encoder {spec.name}: layer {spec.layer} is out of range for "
                         f"{self.source}, which has {self.depth} blocks")


class HFNetwork(Network):
  def __init__(self, source, module, preprocess, tower, projection, patch_size):
    super().__init__(source, module, preprocess)
    self.tower, self.projection, self.patch_size = tower, projection, patch_size

  def forward(self, pixels, layers, pooled):
    out = self.tower(pixel_values=pixels, output_hidden_states=True)
    hidden = out.hidden_states
    states = {layer: hidden[layer] for layer in layers}
    embedding = None
    if pooled:
      embedding = getattr(out, "pooler_output", None)
      if embedding is None:
        raise EncoderError(f"{self.source} returns no pooled output; use tokens=patch")
      if self.projection is not None:
        embedding = self.projection(embedding)
    return states, embedding


class TimmNetwork(Network):
  def forward(self, pixels, layers, pooled):
    model = self.module
    if not layers:
      return {}, model(pixels)
    indices = [layer - 1 if layer > 0 else self.depth + layer for layer in layers]
    with_prefix = self.num_prefix > 0
    final, intermediates = model.forward_intermediates(
        pixels, indices=sorted(set(indices)), norm=False, output_fmt="NLC",
        return_prefix_tokens=with_prefix)
    by_index = {}
    for index, y in zip(sorted(set(indices)), intermediates):
      if with_prefix:
        spatial, prefix = y
        y = torch.cat([prefix, spatial], dim=1)
      by_index[index] = y
    states = {layer: by_index[index] for layer, index in zip(layers, indices)}
    return states, model.forward_head(final) if pooled else None

  def check_layer(self, spec):
    super().check_layer(spec)
    if spec.tokens == "patch" and spec.layer == 0:
      raise EncoderError(f"encoder {spec.name}: layer 0 (the embeddings) is not available "
                         "from timm models; layers count blocks from 1, or from the end")


_PICKLED_SUFFIXES = (".bin", ".pth", ".pt", ".pth.tar", ".ckpt", ".pkl", ".pickle")
_SAFETENSORS_HINT = ("flowmap loads safetensors weights only, so that loading a checkpoint "
                     "never runs code: convert the weights to safetensors once, where you "
                     "trust the file")


def _check_local_dir(source: str, path: str, marker: str, always: bool = False) -> None:
  """A clear error for a local checkpoint folder that is not there (rather than the hub's
  complaint about an invalid repository id), or that holds pickled weights only."""
  looks_local = always or path.startswith(("/", "./", "../", "~")) or os.path.exists(path)
  if not looks_local:
    return
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise EncoderError(f"{source}: no such directory")
  if not os.path.exists(os.path.join(path, marker)):
    raise EncoderError(f"{source}: the directory holds no {marker}")
  names = sorted(os.listdir(path))
  pickled = [n for n in names if n.lower().endswith(_PICKLED_SUFFIXES)]
  if pickled and not any(n.endswith((".safetensors", ".safetensors.index.json"))
                         for n in names):
    raise EncoderError(f"{source}: the weights are pickled ({', '.join(pickled[:3])}); "
                       f"{_SAFETENSORS_HINT}")


class _Unpickling(EncoderError):
  """Raised in place of torch.load while a checkpoint loads."""


@contextlib.contextmanager
def _no_unpickling(source: str):
  """Makes any ``torch.load`` during a checkpoint load fail instead of unpickling: timm (and
  transformers without ``use_safetensors``) fall back to pickled ``.bin``/``.pth`` files
  when a checkpoint has no safetensors, and ``weights_only`` unpickling is still unpickling
  of an untrusted file. Loading happens once, before any worker thread starts."""
  real = torch.load, torch.serialization.load

  def refuse(f, *args, **kwargs):
    name = os.path.basename(str(getattr(f, "name", f)))
    raise _Unpickling(f"{source}: its weights are pickled ({name}); {_SAFETENSORS_HINT}")

  torch.load = torch.serialization.load = refuse
  try:
    yield
  finally:
    torch.load, torch.serialization.load = real


def load_hf(ref: str, processor_ref: Optional[str], trust_remote_code: bool,
            dtype: Optional[torch.dtype]) -> HFNetwork:
  import transformers
  from transformers import AutoConfig, AutoImageProcessor, AutoModel
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  source = f"hf:{ref}"
  _check_local_dir(source, ref, "config.json")
  try:
    config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
  except Exception as e:  # noqa: BLE001 - any failure to load is one configuration error
    if "trust_remote_code" in str(e) and not trust_remote_code:
      raise EncoderError(f"{source} ships its own model code, which runs only with "
                         "--trust_remote_code (read that code first: it runs with your "
                         "permissions)") from None
    raise EncoderError(f"cannot load {source}: {_first_line(e)}") from None
  try:
    processor = AutoImageProcessor.from_pretrained(processor_ref or ref, backend="pil",
                                                   trust_remote_code=trust_remote_code)
  except Exception as e:  # noqa: BLE001
    if "trust_remote_code" in str(e) and not trust_remote_code:
      raise EncoderError(f"the image processor of {source} ships its own code, which runs "
                         "only with --trust_remote_code; or name another with "
                         "processor=<hub id or dir>") from None
    raise EncoderError(
        f"cannot load the image processor of {source} ({_first_line(e)}); name one with "
        f"processor=<hub id or dir>, e.g. processor=openai/clip-vit-large-patch14") from None
  preprocess = preprocess_from_hf_processor(processor)
  try:
    with _no_unpickling(source):
      if config.model_type in ("clip", "clip_vision_model"):
        # The vision tower and its projection only: the text tower is never loaded. A full
        # CLIP checkpoint keeps the projection width at the top level of its config.
        vision_config = config
        if config.model_type == "clip":
          vision_config = config.vision_config
          vision_config.projection_dim = config.projection_dim
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(
            ref, config=vision_config, dtype=dtype or torch.float32, use_safetensors=True)
      else:
        model = AutoModel.from_pretrained(ref, trust_remote_code=trust_remote_code,
                                          dtype=dtype or torch.float32, use_safetensors=True)
  except EncoderError:
    raise
  except Exception as e:  # noqa: BLE001
    hint = f"; {_SAFETENSORS_HINT}" if "safetensors" in str(e) else ""
    raise EncoderError(f"cannot load {source}: {_first_line(e)}{hint}") from None
  tower = getattr(model, "vision_model", model)
  projection = getattr(model, "visual_projection", None)
  vision_config = getattr(config, "vision_config", None) or config
  patch_size = getattr(vision_config, "patch_size", None)
  return HFNetwork(source, model.eval(), preprocess, tower, projection, patch_size)


def load_timm(ref: str, dtype: Optional[torch.dtype]) -> TimmNetwork:
  import timm
  source = f"timm:{ref}"
  if ref.startswith("local-dir:"):
    _check_local_dir(source, ref[len("local-dir:"):], "config.json", always=True)
  try:
    with _no_unpickling(source):
      model = timm.create_model(ref, pretrained=True)
  except EncoderError:
    raise
  except Exception as e:  # noqa: BLE001
    known = ""
    if "Invalid pretrained tag" in str(e):   # e.g. open_clip's tag names
      known = "; timm knows " + ", ".join(timm.list_pretrained(ref.split(".")[0] + ".*"))
    raise EncoderError(f"cannot load {source}: {_first_line(e)}{known}") from None
  if not hasattr(model, "forward_intermediates"):
    raise EncoderError(f"{source}: the model has no forward_intermediates (not a ViT?)")
  data_config = timm.data.resolve_model_data_config(model)
  preprocess = preprocess_from_timm_config(data_config)
  if dtype is not None:
    model = model.to(dtype)
  net = TimmNetwork(source, model.eval(), preprocess)
  net.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
  net.depth = len(model.blocks)
  return net


# ----------------------------------------------------------------------------- encoders

class Encoders:
  """Every requested feature, computed from one batch of images in one pass per network.

  ``encode`` takes the uint8 images of each geometry (``geometries`` lists them) and
  returns float32 numpy arrays [B, tokens, dim] per encoder name.
  """

  def __init__(self, specs: Sequence[EncoderSpec], networks: Mapping[tuple, Network],
               device: torch.device, autocast_dtype: Optional[torch.dtype]):
    self.specs = list(specs)
    self.networks = dict(networks)
    self.device, self.autocast_dtype = device, autocast_dtype
    self.geometries = sorted({n.preprocess.geometry for n in self.networks.values()},
                             key=lambda g: repr(g))
    self.shapes: dict[str, tuple] = {}

  def geometry_index(self, network: Network) -> int:
    return self.geometries.index(network.preprocess.geometry)

  def _autocast(self):
    if self.autocast_dtype is None:
      return torch.autocast(self.device.type, enabled=False)
    return torch.autocast(self.device.type, dtype=self.autocast_dtype)

  def encode(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """``images[g]``: uint8 [B, h, w, 3] for geometry g."""
    outputs = {}
    with torch.inference_mode(), self._autocast():
      for key, net in self.networks.items():
        specs = [s for s in self.specs if s.network_key == key]
        pixels = torch.from_numpy(images[self.geometry_index(net)])
        if self.device.type == "cuda":
          pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        x = net.preprocess.normalize(pixels)
        param = next(net.module.parameters())
        x = x.to(param.dtype)
        layers = sorted({s.layer for s in specs if s.tokens == "patch"})
        states, pooled = net.forward(x, layers, any(s.tokens == "pooled" for s in specs))
        for s in specs:
          if s.tokens == "pooled":
            y = pooled[:, None, :]
          else:
            y = states[s.layer]
            if not s.keep_cls:
              y = y[:, net.num_prefix:]
          outputs[s.name] = y.float().cpu().numpy()
    return outputs

  def describe(self) -> list[dict]:
    out = []
    for s in self.specs:
      net = self.networks[s.network_key]
      out.append({**s.to_json(), "shape": list(self.shapes[s.name]),
                  "preprocess": net.preprocess.to_json()})
    return out


def resolve_device(device: str) -> torch.device:
  if device == "auto":
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device == "cuda" and not torch.cuda.is_available():
    raise EncoderError("--device cuda: no CUDA device is available to torch")
  if device not in ("cpu", "cuda"):
    raise EncoderError(f"--device must be auto, cpu or cuda, not {device!r}")
  return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
  """The autocast (and weight) dtype: bfloat16 on GPUs that have it, float16 on older ones,
  float32 (None) on CPUs unless asked otherwise."""
  table = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
  if precision == "auto":
    if device.type != "cuda":
      return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
  if precision not in table:
    raise EncoderError(f"--precision must be auto, float32, bfloat16 or float16, "
                       f"not {precision!r}")
  return table[precision]


def load_encoders(specs: Sequence[EncoderSpec], device: torch.device,
                  autocast_dtype: Optional[torch.dtype] = None,
                  trust_remote_code: bool = False) -> Encoders:
  """Loads each distinct network once, runs one dummy image through it to learn depth,
  prefix length and feature shapes, and checks every encoder's options against them."""
  check_unique(specs)
  networks = {}
  for spec in specs:
    if spec.network_key in networks:
      continue
    kind, _, ref = spec.source.partition(":")
    weight_dtype = autocast_dtype if device.type == "cuda" else None
    if kind == "hf":
      net = load_hf(ref, spec.processor, trust_remote_code, weight_dtype)
    else:
      net = load_timm(ref, weight_dtype)
    net.module.to(device)
    networks[spec.network_key] = net
  encoders = Encoders(specs, networks, device, autocast_dtype)
  for key, net in networks.items():
    if isinstance(net, HFNetwork):
      _probe_hf(net, [s for s in specs if s.network_key == key], device)
    for spec in specs:
      if spec.network_key == key and spec.tokens == "patch":
        net.check_layer(spec)
  dummies = [np.zeros((1, *g.output_size, 3), np.uint8) for g in encoders.geometries]
  try:
    outputs = encoders.encode(dummies)
  except EncoderError:
    raise
  except Exception as e:  # noqa: BLE001
    raise EncoderError(f"a forward pass of {', '.join(n.source for n in networks.values())} "
                       f"failed: {_first_line(e)}") from None
  encoders.shapes = {s.name: tuple(outputs[s.name].shape[1:]) for s in specs}
  return encoders


def _probe_hf(net: HFNetwork, specs: Sequence[EncoderSpec], device: torch.device) -> None:
  """Depth and number of prefix tokens (CLS, registers) of a transformers tower."""
  h, w = net.preprocess.geometry.output_size
  try:
    with torch.inference_mode():
      x = net.preprocess.normalize(torch.zeros((1, h, w, 3), dtype=torch.uint8, device=device))
      x = x.to(next(net.module.parameters()).dtype)
      out = net.tower(pixel_values=x, output_hidden_states=True)
  except Exception as e:  # noqa: BLE001
    raise EncoderError(f"{net.source}: a forward pass failed: {_first_line(e)}") from None
  if getattr(out, "hidden_states", None) is None:
    raise EncoderError(f"{net.source}: the model returns no hidden states")
  net.depth = len(out.hidden_states) - 1
  seq = out.hidden_states[-1].shape[1]
  if net.patch_size:
    patch = net.patch_size if isinstance(net.patch_size, int) else net.patch_size[0]
    net.num_prefix = max(seq - (h // patch) * (w // patch), 0)
  elif any(s.tokens == "patch" and not s.keep_cls for s in specs):
    raise EncoderError(f"{net.source}: no patch_size in its config, so prefix tokens cannot "
                       "be told from patch tokens; use cls=keep")

"""What the machine offers, decided before JAX starts: CPU vector features, the compute dtype
``model.dtype=auto`` stands for, and flowmap's XLA flags for CPUs.

This module does not import JAX: ``set_xla_flags`` must run before JAX initialises its
backends (XLA reads ``XLA_FLAGS`` once, when the first backend starts), so main.py and the
benchmark call it first, and ``import flowmap`` does too (quietly), so a notebook that
imports flowmap before its first JAX computation gets them.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

# The /proc/cpuinfo flags that decide how fast matmuls run, named in benchmark headers.
VECTOR_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                   "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
# Either gives bfloat16 matmuls in hardware (VDPBF16PS, TDPBF16PS); without them XLA and
# PyTorch emulate bfloat16 through float32, slower than float32 itself.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# flowmap's XLA flags for CPUs, appended to XLA_FLAGS unless the user sets the same flag:
# YNNPACK (XLA's CPU matmul library) keeps the matmuls but leaves the reductions to XLA's own
# fused loops. First for correctness: with jaxlib 0.10.2 YNNPACK's reduce fusions return inf
# or nan for the jitted Next-DiT velocity from batch 512 on, where eager execution and this
# flag give the right values (tests/test_model.py keeps a probe of it). Then for speed: on an
# AVX512_BF16 CPU this made the bfloat16 attention 5-25% faster (issue 15); on an AVX2 CPU it
# measured neutral (train step of `small`: float32 1.007x, bfloat16 0.981x the default time).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
  """The VECTOR_FEATURES this CPU has (the x86 ``flags`` line of /proc/cpuinfo); empty where
  that file is missing or not x86."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split()) & frozenset(VECTOR_FEATURES)
  except OSError:
    pass
  return frozenset()


def describe_cpu(features: Optional[Iterable[str]] = None) -> str:
  """'avx2 fma (bfloat16 emulated)', in VECTOR_FEATURES order, for headers and JSON."""
  features = cpu_features() if features is None else frozenset(features)
  names = " ".join(f for f in VECTOR_FEATURES if f in features) or "no vector features found"
  return f"{names} (bfloat16 {'native' if native_bf16(features) else 'emulated'})"


def native_bf16(features: Optional[Iterable[str]] = None) -> bool:
  """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512_BF16 or AMX)."""
  features = cpu_features() if features is None else frozenset(features)
  return any(f in features for f in NATIVE_BF16_FEATURES)


def resolve_dtype(name: str, backend: str, features: Optional[Iterable[str]] = None) -> str:
  """The compute dtype ``name`` stands for on ``backend`` (jax.default_backend()).

  ``auto`` is bfloat16 on GPUs and TPUs and on CPUs with native bfloat16 matmuls, float32
  elsewhere: on other CPUs emulated bfloat16 is slower than float32 (2-25x, measured)."""
  if name not in DTYPES:
    raise ValueError(f"unknown model.dtype {name!r}; expected one of {list(DTYPES)}")
  if name != "auto":
    return name
  if backend in ("gpu", "cuda", "rocm", "tpu"):
    return "bfloat16"
  if backend == "cpu" and native_bf16(features):
    return "bfloat16"
  return "float32"


def cpu_xla_flags(features: Optional[Iterable[str]] = None) -> tuple:
  """The XLA flags flowmap sets on this CPU (see CPU_XLA_FLAGS); the same on every x86 CPU
  today, the features kept for flags that will depend on them."""
  del features
  return CPU_XLA_FLAGS


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def set_xla_flags(environ=None, features: Optional[Iterable[str]] = None,
                  warn: bool = True) -> list[str]:
  """Appends ``cpu_xla_flags(features)`` (this CPU's by default) to XLA_FLAGS in ``environ``
  (os.environ by default), keeping every flag the user set: a flag of the same name is left
  as the user gave it, and FLOWMAP_XLA_FLAGS=0 in the environment adds none. Returns the flags added. Too late once JAX has started a backend: then
  nothing is changed and a warning is printed, since the flags would silently not apply."""
  environ = os.environ if environ is None else environ
  if environ.get("FLOWMAP_XLA_FLAGS", "1") == "0":   # the user's opt-out
    return []
  jax_bridge = sys.modules.get("jax._src.xla_bridge")
  if environ is os.environ and jax_bridge is not None and jax_bridge.backends_are_initialized():
    if warn and not all(f in environ.get("XLA_FLAGS", "").split()
                        for f in cpu_xla_flags(features)):
      print("flowmap: XLA flags not set: JAX has already started (import flowmap before "
            "running JAX code, or set XLA_FLAGS=" + " ".join(cpu_xla_flags(features)) + ")",
            file=sys.stderr)
    return []
  current = environ.get("XLA_FLAGS", "").split()
  present = {_flag_name(f) for f in current}
  added = [f for f in cpu_xla_flags(features) if _flag_name(f) not in present]
  if added:
    environ["XLA_FLAGS"] = " ".join(current + added)
  return added

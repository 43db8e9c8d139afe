"""How fast flowmap trains and samples, and how that compares with the PyTorch peer.

  python -m flowmap.benchmark --config configs/bench.py:small [--peer lumina] [--out FILE]

prints one JSON object on stdout (the keys of DESIGN.md, "Benchmark JSON") and a readable
table on stderr. Measured: the train step (samples/s, tokens/s, model FLOPs counted
analytically and cross-checked against XLA's cost analysis, TFLOP/s, MFU), compile times, the
Euler and Heun samplers, the tf.data reader, and peak memory.

Every figure is the median of several timed repetitions. A shared machine's load changes by
the minute, so whatever is compared is measured in one process and interleaved: each round
times one window of every contender (the matmul peaks that MFU is taken against, flowmap in
each compute dtype of ``bench.flowmap_dtypes``, the peer in float32 and under bfloat16
autocast) before the next round starts.

The device line names the CPU's vector features (AVX2, AVX-512, AVX512_BF16, AMX): whether
bfloat16 matmuls are native or emulated decides which precision is faster, for flowmap and
for the peer alike. flowmap's CPU XLA flags (flowmap.platform) are set before JAX starts.

``--peer lumina`` runs diffusers' LuminaNextDiT2DModel (flowmap.benchmark_peer) on the same
machine in both precisions; ``ratio`` is flowmap over the peer's better precision.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flowmap import benchmark_peer
from flowmap import data as data_lib
from flowmap import model as model_lib
from flowmap import platform as platform_lib
from flowmap import sampling
from flowmap import sharding
from flowmap import train as train_lib
from flowmap import workdir as workdir_lib
from flowmap.config import ConfigError

# What the benchmark does when the config has no `bench` section (configs/bench.py has one).
DEFAULTS = {
    "warmup_steps": 2,          # untimed train steps after compiling
    "windows": 5,               # timed train windows per contender
    "steps_per_window": 2,
    "sample_batch": 0,          # rows per sampler call; 0: train.batch_size
    "sample_evaluations": (2, 8, 50),
    "solvers": ("euler", "heun"),
    "quality_evaluations": 2,   # Euler evaluations at which flowmap's samples reach the
                                # 50-evaluation flow's quality (README "Few-step samples":
                                # 2 for the flow objective on the demo, 1 for MeanFlow)
    "peer_guided_steps": 30,    # the peer's sampler to compare with: BLIP3-o's 30 Euler
                                # steps with classifier-free guidance (2 evaluations a step)
    "sample_repeats": 3,
    "budget_s": 240.0,          # a contender stops repeating after this much timed work
    "max_call_s": 600.0,        # a call predicted to take longer than this is skipped
    "peak_matmul_size": 0,      # 0: 2048 on CPUs, 8192 on accelerators
    "input_examples": 128,      # rows of the synthetic dataset written when data.dir is empty
    "input_batches": 40,        # batches timed after the first (data.shuffle_buffer_mb
                                # sets the reader's shuffle memory, as in training)
    "peer_precisions": benchmark_peer.PRECISIONS,
    "flowmap_dtypes": (),       # also time flowmap's train step and first Euler sampler in
                                # these compute dtypes (model.dtype is always timed)
    "profile_dir": "",          # after timing: a jax.profiler trace of profile_steps train
                                # steps per compute dtype into <profile_dir>/<dtype>
                                # (TensorBoard's profile tab or xprof reads it)
    "profile_steps": 3,
}

# Dense tensor-core peaks from the datasheets, TFLOP/s: (bfloat16/float16, tf32).
DATASHEET_TFLOPS = {
    "H200": (989.4, 494.7),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.4, 494.7),     # SXM
    "A100": (312.0, 156.0),
    "L40S": (362.1, 183.0),
    "L4": (121.0, 60.0),
    "A10G": (70.0, 35.0),
}


class BenchmarkError(ValueError):
  """A configuration the benchmark cannot run; reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- settings

def settings(config) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict(DEFAULTS)
  if "bench" in config:
    for k, v in config.bench.items():
      if k not in DEFAULTS:
        raise BenchmarkError(f"unknown key bench.{k}; known: {sorted(DEFAULTS)}")
      s[k] = v
  return s


def feature_shapes(config) -> tuple[tuple[int, int], tuple[int, int]]:
  """(source, target) shapes: the dataset's when data.dir is set, else the config's."""
  shapes = {}
  stats = data_lib.load_stats(config.data.dir) if config.data.dir else None
  for role in ("source", "target"):
    configured = config.data.get(f"{role}_shape")
    configured = tuple(int(v) for v in configured) if configured else None
    if stats is not None:
      shapes[role] = data_lib.feature_shape(stats, config.data[role])
      if configured is not None and configured != shapes[role]:
        raise BenchmarkError(f"data.{role}_shape is {configured} but feature "
                             f"{config.data[role]!r} has shape {shapes[role]}")
    elif configured is None:
      raise BenchmarkError(f"no dataset (data.dir) and no data.{role}_shape: the benchmark "
                           "needs the feature shapes from one of them")
    else:
      shapes[role] = configured
  return shapes["source"], shapes["target"]


# ----------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timed:
  """One contender: ``run()`` does one repetition of work to completion, ``units`` of it."""
  name: str
  run: Callable[[], None]
  units: float
  times: list = dataclasses.field(default_factory=list)

  def rate(self) -> Optional[float]:
    return self.units / statistics.median(self.times) if self.times else None


class HostLoad:
  """What else ran on the machine during one stretch of timed work: the cores that other
  processes kept busy (the machine's busy time in /proc/stat less this process's own CPU
  time), the cores the hypervisor gave to other guests (steal), and the 1-minute load
  average (which counts this process's threads too). Linux; None elsewhere."""

  def __init__(self):
    self.start = self._sample()

  @staticmethod
  def _sample():
    try:
      with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
      return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _, _, irq, softirq, steal = ticks
    own = os.times()
    return {"wall": time.perf_counter(), "busy": (user + nice + system + irq + softirq) / hz,
            "steal": steal / hz, "own": own.user + own.system}

  def stop(self) -> Optional[dict]:
    end = self._sample()
    if end is None or self.start is None or end["wall"] <= self.start["wall"]:
      return None
    d = {k: end[k] - self.start[k] for k in end}
    return {"other_cores": max(0.0, (d["busy"] - d["own"]) / d["wall"]),
            "steal_cores": d["steal"] / d["wall"], "load1": os.getloadavg()[0]}


def summarise_load(rounds: list) -> dict:
  """min / mean / max over the timed rounds of each HostLoad figure."""
  rounds = [r for r in rounds if r is not None]
  summary = {"cpus": os.cpu_count(), "rounds": len(rounds),
             "note": "other_cores: cores busy with other processes while the contenders ran "
                     "(0 on a quiet machine); steal_cores: taken by other guests of the "
                     "hypervisor; load1: the 1-minute load average, this process included"}
  for key in ("other_cores", "steal_cores", "load1"):
    values = [r[key] for r in rounds]
    if values:
      summary[key] = {"min": min(values), "mean": statistics.fmean(values),
                      "max": max(values)}
  return summary


def round_robin(contenders: list[Timed], repeats: int, budget_s: float) -> list:
  """Times every contender once per round, so that load changes hit all of them alike; a
  contender whose timed work passed ``budget_s`` sits out the remaining rounds. Returns each
  round's HostLoad figures: on a shared machine they say how far the figures are from a
  quiet machine's."""
  loads = []
  for r in range(repeats):
    load = HostLoad()
    for c in contenders:
      if r and sum(c.times) > budget_s:
        continue
      start = time.perf_counter()
      c.run()
      c.times.append(time.perf_counter() - start)
    loads.append(load.stop())
  return loads


def peak_matmul(dtype, n: int) -> Timed:
  """A large matmul in the compute dtype with float32 accumulation: the peak MFU is taken
  against, measured on the same device in the same run."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)).lower(
      a, b).compile()
  f(a, b).block_until_ready()
  return Timed("peak matmul", lambda: f(a, b).block_until_ready(), 2.0 * n ** 3)


# ----------------------------------------------------------------------------- memory

def _status_kib(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


class HostMemory:
  """Peak resident memory of one phase: the kernel's high-water mark is reset at the start
  (Linux), so a phase's peak is its own and not an earlier phase's."""

  def __init__(self):
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.reset = True
    except OSError:
      self.reset = False
    self.start_kib = _status_kib("VmRSS")

  def peak_mb(self) -> Optional[float]:
    hwm = _status_kib("VmHWM") if self.reset else None
    return None if hwm is None else hwm / 1024

  def increase_mb(self) -> Optional[float]:
    peak = self.peak_mb()
    return None if peak is None or self.start_kib is None else peak - self.start_kib / 1024


def device_peak_memory_mb() -> Optional[float]:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2 ** 20


# ----------------------------------------------------------------------------- device

def describe_device() -> tuple[str, dict]:
  d = jax.local_devices()[0]
  info = {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
          "processes": jax.process_count(), "host_cpus": os.cpu_count(),
          "jax": jax.__version__}
  if d.platform == "cpu":
    cpu = platform.processor() or "cpu"
    try:
      with open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
      pass
    features = platform_lib.cpu_features()
    info.update(cpu=cpu, cpu_features=sorted(features), native_bf16=platform_lib.native_bf16(
        features), xla_flags=os.environ.get("XLA_FLAGS", ""))
    return (f"cpu: {cpu}, {os.cpu_count()} cores, {platform_lib.describe_cpu(features)}",
            info)
  return f"{d.device_kind} x{jax.device_count()}", info


def datasheet_tflops(device_kind: str, dtype) -> Optional[float]:
  for name, (half, tf32) in DATASHEET_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return tf32 if jnp.dtype(dtype) == jnp.float32 else half
  return None


# ----------------------------------------------------------------------------- flowmap

class Flowmap:
  """flowmap's train step and samplers, built as train.py and evaluate.py build them."""

  def __init__(self, config, model_cfg: model_lib.ModelConfig, sample_batch: int):
    self.config, self.model_cfg = config, model_cfg
    self.batch = config.train.batch_size
    self.mesh = sharding.make_mesh(config.mesh)
    self.tx = train_lib.make_optimizer(config)
    self.graphdef, self.state, shardings = train_lib.create_state(
        model_cfg, self.tx, config.seed, self.mesh)
    batch_shard = sharding.batch_sharding(self.mesh)
    keys = jax.random.split(jax.random.key(config.seed), 4)
    (ns, ds), (nt, dt) = model_cfg.source_shape, model_cfg.target_shape
    put = lambda x: jax.device_put(x, batch_shard)
    self.train_batch = {"source": put(jax.random.normal(keys[0], (self.batch, ns, ds))),
                        "target": put(jax.random.normal(keys[1], (self.batch, nt, dt)))}
    self.sample_source = put(jax.random.normal(keys[2], (sample_batch, ns, ds)))
    self.sample_noise = put(jax.random.normal(keys[3], (sample_batch, nt, dt)))
    self.sample_batch = sample_batch
    step = jax.jit(train_lib.make_train_step(config, self.graphdef, self.tx),
                   in_shardings=(shardings, {"source": batch_shard, "target": batch_shard}),
                   out_shardings=(shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))
    start, cpu = time.perf_counter(), time.process_time()
    self.step = step.lower(self.state, self.train_batch).compile()
    self.compile_s = time.perf_counter() - start
    self.compile_cpu_s = time.process_time() - cpu   # less sensitive to a busy machine
    self.xla_flops_raw = _cost_flops(self.step)

  def run_steps(self, n: int) -> None:
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.train_batch)
    jax.block_until_ready((self.state, metrics))

  def xla_block_flops(self) -> Optional[float]:
    """XLA's count for one block's forward and backward pass, batch included.

    XLA's cost analysis counts the body of a while loop once, and the blocks run in one
    lax.scan, so the step's count is completed with (depth - 1) of these. (The source keys
    and values of every block are one matmul outside the scan, counted in full already.)
    """
    cfg = self.model_cfg
    graphdef, state = nnx.split(model_lib.Block(cfg, rngs=nnx.Rngs(0)))
    target_angles, source_angles = model_lib.NextDiT.rope_tables(cfg)
    b, dt = self.batch, cfg.compute_dtype
    h = jnp.zeros((b, cfg.target_shape[0], cfg.dim), dt)
    kv = jnp.zeros((b, cfg.kv_heads, cfg.source_shape[0], cfg.head_dim), dt)
    c = jnp.zeros((b, cfg.cond_dim), dt)

    def f(state, h, sk, sv, c):
      out = nnx.merge(graphdef, state)(h, c, target_angles, sk, sv, source_angles is not None)
      return jnp.sum(out.astype(jnp.float32))
    return _cost_flops(jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4))).lower(
        state, h, kv, kv, c).compile())

  def sampler(self, solver: str, evaluations: int) -> tuple[Callable, float]:
    generate = sampling.make_sampler(self.graphdef, solver, evaluations)
    params = self.state["ema"]
    start = time.perf_counter()
    compiled = generate.lower(params, self.sample_source, self.sample_noise).compile()
    compile_s = time.perf_counter() - start
    # The state is donated by every train step: look the EMA up when the sampler runs.
    return (lambda: compiled(self.state["ema"], self.sample_source,
                             self.sample_noise).block_until_ready()), compile_s


def _cost_flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


# ----------------------------------------------------------------------------- input

def input_pipeline(config, source_shape, target_shape, s) -> dict:
  """data.measure_input's figures for the streamed reader that feeds training (not the
  in-memory path small splits take), on config.data.dir or on a synthetic features dataset
  of the configured shapes in float16, written to a temporary directory.

  Measured in a fresh process of its own, so that its CPU time and peak memory are the
  reader's alone (measure_input reads the process's)."""
  names = [config.data.source or "source", config.data.target or "target"]
  batch = int(config.train.batch_size)
  with tempfile.TemporaryDirectory(prefix="flowmap-bench-") as tmp:
    data_dir = config.data.dir
    if not data_dir:
      data_dir = tmp
      rng = np.random.default_rng(config.seed)
      data_lib.write_dataset(
          data_dir, {"train": ({"key": f"{i:06d}", "features": {
              names[0]: rng.standard_normal(source_shape, np.float32),
              names[1]: rng.standard_normal(target_shape, np.float32)}}
              for i in range(max(int(s.input_examples), batch)))},
          {names[0]: source_shape, names[1]: target_shape})
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
      figures = pool.submit(
          data_lib.measure_input, data_dir, names, batch, batches=int(s.input_batches),
          seed=int(config.seed),
          shuffle_buffer_bytes=int(config.data.shuffle_buffer_mb * 2 ** 20)).result()
    rows = data_lib.load_stats(data_dir)["features"][names[0]]["count"]   # of the train split
  return {**figures, "dataset": config.data.dir or "synthetic TFRecords (float16)",
          "rows": rows}


# ----------------------------------------------------------------------------- the run

def profile_train(fm: "Flowmap", path: str, steps: int) -> str:
  """A jax.profiler trace of ``steps`` compiled train steps (already warm) into ``path``."""
  fm.run_steps(1)
  with jax.profiler.trace(path):
    fm.run_steps(steps)
  return path


def with_dtype(model_cfg: model_lib.ModelConfig, dtype: str, attention: str):
  """``model_cfg`` computing in ``dtype``, its attention kernel re-resolved for that dtype
  (``auto`` picks cuDNN only for half precision)."""
  cfg = dataclasses.replace(model_cfg, dtype=dtype, attention=attention)
  return dataclasses.replace(cfg, attention=cfg.attention_implementation())


def run(config, peer: str = "") -> dict:
  s = settings(config)
  workdir_lib.validate_config(config)
  source_shape, target_shape = feature_shapes(config)
  backend = jax.default_backend()
  try:
    model_cfg = workdir_lib.model_config(config, source_shape, target_shape)
    dtypes = list(dict.fromkeys([model_cfg.dtype] + [
        platform_lib.resolve_dtype(d, backend) for d in s.flowmap_dtypes]))
    configs = {d: model_cfg if d == model_cfg.dtype else
               with_dtype(model_cfg, d, config.model.get("attention", "auto")) for d in dtypes}
  except ValueError as e:
    raise BenchmarkError(str(e)) from None
  batch = int(config.train.batch_size)
  sample_batch = int(s.sample_batch or batch)
  device, device_info = describe_device()
  flops = model_lib.flops(model_cfg)
  nt = target_shape[0]
  result = {
      "device": device, "device_info": device_info,
      "model": {"dim": model_cfg.dim, "depth": model_cfg.depth, "heads": model_cfg.heads,
                "kv_heads": model_cfg.kv_heads, "dtype": model_cfg.dtype,
                "attention": model_cfg.attention, "remat": model_cfg.remat,
                "scan_unroll": model_cfg.scan_unroll},
      "batch": batch, "sample_batch": sample_batch,
      "source_shape": list(source_shape), "target_shape": list(target_shape),
  }
  log = lambda msg: print(f"[benchmark] {msg}", file=sys.stderr, flush=True)
  log(device)

  # -- flowmap: compile, warm up, the phase's memory (model.dtype's; then the other dtypes)
  flowmaps = {}
  for d in dtypes:
    memory = HostMemory()
    flowmaps[d] = Flowmap(config, configs[d], sample_batch)
    log(f"flowmap {d} train step compiled in {flowmaps[d].compile_s:.1f} s "
        f"(attention {configs[d].attention})")
    flowmaps[d].run_steps(int(s.warmup_steps))
    if d == model_cfg.dtype:
      result["params"] = int(sum(x.size for x in jax.tree.leaves(flowmaps[d].state["params"])))
      result["peak_host_memory_mb"] = memory.peak_mb()
      result["host_memory_increase_mb"] = memory.increase_mb()
  fm = flowmaps[model_cfg.dtype]

  # -- the peer: build and warm up each precision (eager PyTorch needs one step)
  lumina = None
  if peer == "lumina":
    memory = HostMemory()
    try:
      lumina = benchmark_peer.LuminaPeer(config, model_cfg, sample_batch)
    except ValueError as e:
      raise BenchmarkError(str(e)) from None
    warm = {}
    for p in s.peer_precisions:
      start = time.perf_counter()
      lumina.train_steps(1, p)
      warm[p] = time.perf_counter() - start
      log(f"peer {p}: first train step {warm[p]:.1f} s")
    peer_memory = memory.increase_mb()
  elif peer:
    raise BenchmarkError(f"unknown peer {peer!r}; the peer is 'lumina'")

  # -- train: the matmul peaks, flowmap, the peer, interleaved window by window
  n = int(s.peak_matmul_size) or (2048 if device_info["platform"] == "cpu" else 8192)
  peaks = {d: peak_matmul(jnp.dtype(d), n) for d in dict.fromkeys(dtypes + ["bfloat16"])}
  for d, p in peaks.items():
    p.name = f"peak matmul {d}"
  steps = int(s.steps_per_window)
  fm_train = {d: Timed(f"flowmap {d} train", lambda f=f: f.run_steps(steps), steps * batch)
              for d, f in flowmaps.items()}
  contenders = [*peaks.values(), *fm_train.values()]
  peer_train = {}
  for p in (s.peer_precisions if lumina else ()):
    if warm[p] * steps > s.max_call_s:
      log(f"peer {p}: a train window would take ~{warm[p] * steps:.0f} s; one step is timed")
      peer_train[p] = Timed(f"peer {p} train", lambda p=p: lumina.train_steps(1, p), batch)
    else:
      peer_train[p] = Timed(f"peer {p} train", lambda p=p: lumina.train_steps(steps, p),
                            steps * batch)
    contenders.append(peer_train[p])
  log("timing train windows: " + ", ".join(c.name for c in contenders))
  load = round_robin(contenders, int(s.windows), s.budget_s)
  repetitions = {c.name: len(c.times) for c in contenders}

  by_dtype = {}
  for d in dtypes:
    rate = fm_train[d].rate()
    achieved = rate * flops["train"]
    by_dtype[d] = {"attention": configs[d].attention, "train_samples_per_s": rate,
                   "train_tflops": achieved / 1e12,
                   "mfu": achieved / peaks[d].rate(),
                   "mfu_bfloat16_peak": achieved / peaks["bfloat16"].rate(),
                   "compile_s": flowmaps[d].compile_s}
  train_rate = by_dtype[model_cfg.dtype]["train_samples_per_s"]
  peak_flops = peaks[model_cfg.dtype].rate()
  achieved = train_rate * flops["train"]
  result.update({
      "train_samples_per_s": train_rate,
      "train_tokens_per_s": train_rate * nt,
      "flops_per_step": flops["train"] * batch,
      "flops_per_example": {k: float(v) for k, v in flops.items()},
      "train_tflops": achieved / 1e12,
      "peak_tflops": peak_flops / 1e12,
      "peak_tflops_by_dtype": {d: p.rate() / 1e12 for d, p in peaks.items()},
      "peak_matmul": {"size": n, "dtype": model_cfg.dtype, "accumulation": "float32"},
      "mfu": achieved / peak_flops,
      "mfu_bfloat16_peak": achieved / peaks["bfloat16"].rate(),
  })
  sheet = datasheet_tflops(device_info["kind"], model_cfg.compute_dtype)
  if sheet is not None and device_info["platform"] != "cpu":
    result["datasheet_peak_tflops"] = sheet
    result["mfu_datasheet"] = achieved / 1e12 / sheet
  if fm.xla_flops_raw is not None:
    block = fm.xla_block_flops()
    # the scan's body (scan_unroll blocks) is counted once; the other blocks are added
    xla = fm.xla_flops_raw + (model_cfg.depth - model_cfg.scan_unroll) * (block or 0.0)
    result["xla_flops_per_step"] = xla
    result["flops_check"] = xla / result["flops_per_step"]   # XLA / analytic
  result["peak_device_memory_mb"] = device_peak_memory_mb()

  # -- samplers: compile, then every solver (model.dtype), Euler at the first evaluation
  #    count for the other dtypes, and the peer's Euler loop, interleaved
  compile_s = {"train_step": fm.compile_s, "train_step_cpu": fm.compile_cpu_s}
  sampler_compile = {solver: {} for solver in s.solvers}
  sample_rates = {solver: {} for solver in s.solvers}
  peer_sample = {p: {} for p in (s.peer_precisions if lumina else ())}
  skipped = []
  # The peer's seconds per evaluation, to skip hopeless long loops: first guessed as a third
  # of a train step (forward only), then measured.
  per_eval = {p: warm[p] / 3 * sample_batch / batch for p in peer_sample}
  for round_index, evaluations in enumerate(s.sample_evaluations):
    e = str(evaluations)
    flowmap_timed, other_timed, peer_timed = {}, {}, {}
    for solver in s.solvers:
      fn, sampler_compile[solver][e] = fm.sampler(solver, int(evaluations))
      flowmap_timed[solver] = Timed(f"flowmap {solver} {e}", fn, sample_batch)
    for d in (dtypes[1:] if round_index == 0 else ()):
      fn, _ = flowmaps[d].sampler("euler", int(evaluations))
      other_timed[d] = Timed(f"flowmap {d} euler {e}", fn, sample_batch)
    for p in peer_sample:
      predicted = per_eval.get(p, 0.0) * evaluations
      if predicted > s.max_call_s:
        skipped.append(f"peer {p} euler {e}: ~{predicted:.0f} s per call, over "
                       f"bench.max_call_s={s.max_call_s:g}")
        log("skipping " + skipped[-1])
        continue
      peer_timed[p] = Timed(f"peer {p} euler {e}",
                            lambda p=p, n=int(evaluations): lumina.euler(n, p), sample_batch)
    contenders = [*flowmap_timed.values(), *other_timed.values(), *peer_timed.values()]
    log("timing samplers: " + ", ".join(c.name for c in contenders))
    load += round_robin(contenders, int(s.sample_repeats), s.budget_s)
    repetitions.update({c.name: len(c.times) for c in contenders})
    for solver, c in flowmap_timed.items():
      sample_rates[solver][e] = c.rate()
    for d, c in other_timed.items():
      by_dtype[d]["sample_samples_per_s"] = {"euler": {e: c.rate()}}
    for p, c in peer_timed.items():
      peer_sample[p][e] = c.rate()
      per_eval[p] = statistics.median(c.times) / evaluations
  by_dtype[model_cfg.dtype]["sample_samples_per_s"] = sample_rates
  measured = {p: per_eval[p] for p in peer_sample if peer_sample[p]}   # not the guesses
  result["at_flow50_quality"] = at_flow50_quality(s, sample_rates, measured, sample_batch)
  first = str(s.sample_evaluations[0])
  compile_s["sampler"] = sampler_compile[s.solvers[0]][first]
  result["compile_s"] = compile_s
  result["sampler_compile_s"] = sampler_compile
  result["sample_samples_per_s"] = sample_rates
  result["flowmap_by_dtype"] = by_dtype

  # -- input pipeline, next to what the train step consumes
  #    (on a CPU the reader and the step share the cores: input_cores_at_train_rate is the
  #    share the reader would take from the step at its rate)
  result["input"] = input_pipeline(config, source_shape, target_shape, s)
  result["input_samples_per_s"] = result["input"]["samples_per_s"]
  result["input_over_train"] = result["input_samples_per_s"] / train_rate
  result["input_cores_at_train_rate"] = train_rate * result["input"]["cpu_ms_per_sample"] / 1e3

  if lumina is not None:
    peer_result = {**lumina.describe(), "host_memory_increase_mb": peer_memory,
                   "flops_per_example": lumina.flops_per_example()}
    for p in s.peer_precisions:
      r = peer_train[p].rate()
      peer_result[p] = {"train_samples_per_s": r, "train_tokens_per_s": r * nt,
                        "train_tflops": r * peer_result["flops_per_example"]["train"] / 1e12,
                        "sample_samples_per_s": {"euler": peer_sample[p]}}
    best_train = max(peer_result[p]["train_samples_per_s"] for p in s.peer_precisions)
    best_sample = {}
    for e in s.sample_evaluations:
      rates = [peer_sample[p].get(str(e)) for p in s.peer_precisions]
      rates = [r for r in rates if r is not None]
      best_sample[str(e)] = max(rates) if rates else None
    peer_result["best"] = {"train_samples_per_s": best_train,
                           "sample_samples_per_s": {"euler": best_sample}}
    result["peer"] = peer_result
    over = lambda r, best: r / best if r is not None and best else None
    result["ratio"] = {
        "train_samples_per_s": train_rate / best_train,
        "sample_samples_per_s": {solver: {e: over(r, best_sample.get(e))
                                          for e, r in sample_rates[solver].items()}
                                 for solver in s.solvers},
        "by_dtype": {d: {"train_samples_per_s": over(v["train_samples_per_s"], best_train),
                         "euler": {e: over(r, best_sample.get(e)) for e, r in
                                   v.get("sample_samples_per_s", {}).get("euler", {}).items()}}
                     for d, v in by_dtype.items()},
        "note": "flowmap / the peer's better precision; samplers against the peer's Euler "
                "loop at the same number of model evaluations",
    }
  if s.profile_dir:   # untimed: tracing slows the steps it records
    result["profile_dirs"] = {d: profile_train(f, os.path.join(s.profile_dir, d),
                                               int(s.profile_steps))
                              for d, f in flowmaps.items()}
    log(f"profiles written under {s.profile_dir}")
  result["repetitions"] = repetitions
  result["host_load"] = summarise_load(load)
  if skipped:
    result["skipped"] = skipped
  return result


def at_flow50_quality(s, sample_rates: dict, peer_seconds_per_evaluation: dict,
                      sample_batch: int) -> Optional[dict]:
  """Samples per second where they are worth the same: flowmap's Euler sampler at
  ``bench.quality_evaluations`` (the evaluations at which trained runs' samples reach the
  50-evaluation flow's Frechet distance, measured in the README), next to the peer's
  classifier-free-guided Euler loop of ``bench.peer_guided_steps`` steps (BLIP3-o's 30 at
  guidance 3: two evaluations a step), extrapolated from its per-evaluation time in the
  longest loop timed (its cost is linear in the evaluations). None when that evaluation count
  was not timed."""
  n = str(int(s.quality_evaluations))
  rate = sample_rates.get("euler", {}).get(n)
  if rate is None:
    return None
  out = {"flowmap_evaluations": int(n), "flowmap_samples_per_s": rate}
  if peer_seconds_per_evaluation:
    evaluations = 2 * int(s.peer_guided_steps)
    best = min(peer_seconds_per_evaluation.values())
    out.update(peer_evaluations=evaluations,
               peer_samples_per_s=sample_batch / (best * evaluations),
               peer_note="extrapolated from the peer's timed Euler loops at its better "
                         "precision")
    out["ratio"] = rate / out["peer_samples_per_s"]
  return out


# ----------------------------------------------------------------------------- report

def table(r: dict) -> str:
  f = lambda x, spec=".2f": "n/a" if x is None else format(x, spec)
  m = r["model"]
  lines = [
      f"device           {r['device']}",
      f"model            dim {m['dim']}, depth {m['depth']}, heads {m['heads']}, "
      f"{m['dtype']}, {r['params'] / 1e6:.1f}M params; batch {r['batch']}, "
      f"source {tuple(r['source_shape'])}, target {tuple(r['target_shape'])}",
      f"train            {f(r['train_samples_per_s'])} samples/s, "
      f"{f(r['train_tokens_per_s'], '.0f')} tokens/s, {f(r['train_tflops'], '.4f')} TFLOP/s",
      f"MFU              {f(100 * r['mfu'], '.1f')}% of a measured {m['dtype']} matmul peak "
      f"of {f(r['peak_tflops'], '.4f')} TFLOP/s; {f(100 * r['mfu_bfloat16_peak'], '.1f')}% of "
      f"the bfloat16 peak of {f(r['peak_tflops_by_dtype']['bfloat16'], '.4f')}"
      + (f"; {f(100 * r['mfu_datasheet'], '.1f')}% of the datasheet's "
         f"{r['datasheet_peak_tflops']}" if "mfu_datasheet" in r else ""),
      f"FLOPs per step   {r['flops_per_step'] / 1e9:.1f} G analytic"
      + (f", XLA / analytic {r['flops_check']:.3f}" if "flops_check" in r else ""),
      f"compile          train step {f(r['compile_s']['train_step'], '.1f')} s "
      f"({f(r['compile_s']['train_step_cpu'], '.1f')} s CPU), "
      f"sampler {f(r['compile_s']['sampler'], '.1f')} s",
  ]
  for solver, rates in r["sample_samples_per_s"].items():
    lines.append(f"sample {solver:<9} " + ", ".join(
        f"{f(v)} samples/s at {e} evals" for e, v in rates.items()))
  for d, v in r["flowmap_by_dtype"].items():
    if d == m["dtype"]:
      continue
    euler = v.get("sample_samples_per_s", {}).get("euler", {})
    lines.append(f"flowmap {d:<8} train {f(v['train_samples_per_s'])} samples/s, MFU "
                 f"{f(100 * v['mfu'], '.1f')}% ({f(100 * v['mfu_bfloat16_peak'], '.1f')}% of "
                 f"bfloat16's), compile {f(v['compile_s'], '.1f')} s; euler "
                 + ", ".join(f"{f(x)} at {e}" for e, x in euler.items()))
  i = r["input"]
  lines.append(f"input pipeline   {f(r['input_samples_per_s'], '.1f')} samples/s "
               f"({f(r['input_over_train'], '.1f')}x the train step's consumption), "
               f"{f(i['mib_per_s'], '.0f')} MiB/s, {f(i['cpu_ms_per_sample'], '.1f')} CPU ms "
               f"a sample ({f(r['input_cores_at_train_rate'], '.2f')} cores at the train "
               f"rate), first batch {f(i['first_batch_s'], '.1f')} s, peak "
               f"{f(i['peak_rss_gib'], '.2f')} GiB; {i['dataset']}, {i['rows']} rows")
  load = r["host_load"]
  if "other_cores" in load:
    span = lambda k: f"{load[k]['min']:.2f}-{load[k]['max']:.2f}"
    lines.append(f"host load        other processes {span('other_cores')} cores, steal "
                 f"{span('steal_cores')}, load average {span('load1')} "
                 f"({load['cpus']} CPUs, {load['rounds']} timed rounds)")
  lines.append(f"host memory      peak {f(r['peak_host_memory_mb'], '.0f')} MB"
               + (f", device peak {f(r['peak_device_memory_mb'], '.0f')} MB"
                  if r.get("peak_device_memory_mb") else ""))
  if "peer" in r:
    p = r["peer"]
    for prec in (k for k in p if isinstance(p[k], dict) and "train_samples_per_s" in p[k]
                 and k != "best"):
      ps = p[prec]
      lines.append(f"peer {prec:<11} train {f(ps['train_samples_per_s'])} samples/s "
                   f"({f(ps['train_tflops'], '.4f')} TFLOP/s); euler "
                   + ", ".join(f"{f(v)} at {e}"
                               for e, v in ps["sample_samples_per_s"]["euler"].items()))
    ratio = r["ratio"]
    lines.append(f"flowmap / peer   train {f(ratio['train_samples_per_s'])}x; "
                 + "; ".join(f"{solver} " + ", ".join(f"{f(v)}x at {e}" for e, v in d.items())
                             for solver, d in ratio["sample_samples_per_s"].items()))
    for d, v in ratio["by_dtype"].items():
      if d != m["dtype"]:
        lines.append(f"  ({d} / peer   train {f(v['train_samples_per_s'])}x; euler "
                     + ", ".join(f"{f(x)}x at {e}" for e, x in v["euler"].items()) + ")")
  q = r.get("at_flow50_quality")
  if q:
    lines.append(f"at the 50-evaluation flow's quality: flowmap euler "
                 f"{q['flowmap_evaluations']} evals {f(q['flowmap_samples_per_s'])} samples/s"
                 + (f", peer guided euler {q['peer_evaluations'] // 2} steps "
                    f"{f(q['peer_samples_per_s'])} samples/s (extrapolated): "
                    f"{f(q['ratio'])}x" if "ratio" in q else ""))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  from absl import flags
  FLAGS = flags.FLAGS
  platform_lib.set_xla_flags()   # before the first JAX computation starts the backend
  try:
    result = run(FLAGS.config, FLAGS.peer)
  except (BenchmarkError, ConfigError) as e:
    print(f"flowmap.benchmark: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(table(result), file=sys.stderr)
  text = json.dumps(result, indent=1)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")
  print(text)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)   # config files import `configs.default`
  config_flags.DEFINE_config_file("config", os.path.join(root, "configs", "bench.py"),
                                  "ml_collections config file.", lock_config=True)
  flags.DEFINE_enum("peer", "", ["", "lumina"], "Also measure this PyTorch peer.")
  flags.DEFINE_string("out", "", "Also write the JSON object to this file.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)

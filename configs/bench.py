"""The benchmark's sizes: `python -m flowmap.benchmark --config configs/bench.py:SIZE`.

SIZE is tiny (the CI smoke test, seconds), small, base or large (named model sizes of
DESIGN.md on CLIP ViT-L/14-like features: 256 patch tokens of 1024 dims on both sides).
Without data.dir the benchmark takes the shapes from data.source_shape / data.target_shape
and writes a synthetic features dataset of those shapes for the input pipeline.
"""

import ml_collections

from configs import default

SHAPES = {   # (source, target), (tokens, dim)
    "tiny": ((16, 32), (16, 24)),
    "small": ((256, 1024), (256, 1024)),
    "base": ((256, 1024), (256, 1024)),
    "large": ((256, 1024), (256, 1024)),
}


def get_config(size: str = "small"):
  if size not in SHAPES:
    raise ValueError(f"unknown benchmark size {size!r}; expected one of {list(SHAPES)}")
  c = default.get_config()
  c.data.source, c.data.target = "source", "target"
  c.data.source_shape, c.data.target_shape = SHAPES[size]
  c.model.size = size
  # The architecture the PyTorch peer has too: no per-position source path, no linear prior.
  c.model.aligned_conditioning = False
  c.model.prior = "none"
  # The timed model.dtype: float32 suits CPUs without AVX512_BF16 or AMX, where bfloat16
  # matmuls are emulated; bench.flowmap_dtypes times bfloat16 beside it either way (use
  # --config.model.dtype=bfloat16 on GPUs and on CPUs with native bfloat16).
  c.model.dtype = "float32"
  c.train.batch_size = 8
  c.train.steps = 100_000
  c.train.warmup_steps = 10   # so that the timed steps update the parameters

  c.bench = ml_collections.ConfigDict()
  c.bench.warmup_steps = 2
  c.bench.windows = 5
  c.bench.steps_per_window = 2
  c.bench.sample_batch = 0            # 0: train.batch_size
  c.bench.sample_evaluations = (2, 8, 50)
  c.bench.solvers = ("euler", "heun")
  c.bench.quality_evaluations = 2     # Euler evaluations at the 50-evaluation flow's quality
  c.bench.peer_guided_steps = 30      # the peer's guided Euler steps to compare with
  c.bench.sample_repeats = 3
  c.bench.budget_s = 180.0            # a contender stops repeating after this much timed
                                      # work (the peer's emulated bf16 autocast: ~2 steps)
  c.bench.max_call_s = 600.0          # a call predicted longer than this is skipped
  c.bench.peak_matmul_size = 0        # 0: 2048 on CPUs, 8192 on accelerators
  c.bench.input_examples = 128
  c.bench.input_batches = 40
  c.bench.peer_precisions = ("float32", "bf16_autocast")
  c.bench.flowmap_dtypes = ("float32", "bfloat16")   # compute dtypes timed beside model.dtype
  c.bench.profile_dir = ""            # a directory: trace bench.profile_steps train steps per
  c.bench.profile_steps = 3           # dtype after timing (TensorBoard's profile tab, xprof)

  if size == "small":
    # Six blocks unrolled: the scan's per-block stacking and slicing copies (~18% of the
    # step) go, for a compile about 3x longer (measured side by side: 0.78x the step time).
    c.model.scan_unroll = 6

  if size == "tiny":
    c.model.dim, c.model.depth, c.model.heads = 64, 2, 4
    c.bench.warmup_steps = 1
    c.bench.windows = 2
    c.bench.steps_per_window = 1
    c.bench.sample_evaluations = (2,)
    c.bench.sample_repeats = 2
    c.bench.peak_matmul_size = 256
    c.bench.input_examples = 32
    c.bench.input_batches = 8
  return c

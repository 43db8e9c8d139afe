"""The training loop, top to bottom: setup, data, state, checkpoint, step, evaluation, loop.

Every random stream is a function of (config.seed, step) and the data order a function of
config.seed, so a resumed run sees the batches and noise the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from flowmap import checkpoint as checkpoint_lib
from flowmap import data as data_lib
from flowmap import evaluate as evaluate_lib
from flowmap import flow
from flowmap import model as model_lib
from flowmap import plots
from flowmap import sampling
from flowmap import sharding
from flowmap import workdir as workdir_lib
from flowmap.config import ConfigError, NonFiniteError, Preempted

SMALL_DATA_ROWS = 50_000   # below this many training rows, without train.select_rows, a hint


class PreemptionWatcher:
  """Turns SIGTERM, SIGINT and SIGUSR1 (SLURM's `--signal` pre-timeout warning) into a
  checkpoint at the next step boundary.

  With several processes every host must stop at the same step, so JAX's preemption sync
  point (started by jax.distributed.initialize, which catches SIGTERM) decides; a single
  process only needs its own signal flag.
  """
  SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

  def __init__(self):
    import signal
    self.signal_name = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    for name in self.SIGNALS:
      sig = getattr(signal, name)
      if self._multi and sig == signal.SIGTERM:
        continue   # JAX's preemption notifier owns SIGTERM across hosts
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread: leave signals alone
        pass

  def _handle(self, signum, frame):
    import signal
    self.signal_name = signal.Signals(signum).name
    if self._multi:   # let the preemption notifier agree a step with the other hosts
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
    return self.signal_name is not None

  def close(self) -> None:
    import signal
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ----------------------------------------------------------------------------- state

def learning_rate(config) -> optax.Schedule:
  """Linear warmup, then cosine decay to lr * min_lr_ratio at train.steps."""
  t = config.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=min(t.warmup_steps, t.steps),
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def make_optimizer(config) -> optax.GradientTransformation:
  t = config.train
  schedule = learning_rate(config)

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in jax.tree_util.keystr(path), params)

  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


def create_model(model_cfg: model_lib.ModelConfig, seed: int) -> model_lib.NextDiT:
  return model_lib.NextDiT(model_cfg, rngs=nnx.Rngs(params=seed))


def abstract_state(model_cfg, tx, seed):
  """Shapes of the train state and the model's graphdef, without allocating anything."""
  def init():
    graphdef, params = nnx.split(create_model(model_cfg, seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params), "ema": params}
  graphdef, _ = sampling.abstract_model(model_cfg, seed)
  return graphdef, init, jax.eval_shape(init)


def create_state(model_cfg, tx, seed, mesh):
  """The train state created directly in its shardings (no host copy of the parameters)."""
  graphdef, init, shapes = abstract_state(model_cfg, tx, seed)
  shardings = sharding.state_shardings(shapes, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


# ----------------------------------------------------------------------------- step

def _per_example(key, x1, config):
  """Times, noise and condition dropout for a whole batch, per example, so that gradient
  accumulation sees exactly the draws the same batch would see in one piece."""
  k_t, k_n, k_d = jax.random.split(key, 3)
  f = config.flow
  t = flow.sample_time(k_t, x1.shape[0], f.time_sampling, f.logit_mean, f.logit_std, f.shift,
                       f.mean_fraction)
  noise = jax.random.normal(k_n, x1.shape, jnp.float32)
  drop = flow.condition_dropout(k_d, x1.shape[0], f.cond_dropout)
  if f.objective == "meanflow":   # the interval's end; the same t, noise and drop streams
    t, end = flow.sample_interval(jax.random.fold_in(k_t, 7), t, f.interval_fraction,
                                  f.time_sampling, f.logit_mean, f.logit_std, f.shift)
  else:
    end = t
  return t, end, noise, drop


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _per_block_norm(blocks_tree) -> jax.Array:
  """Norm of each stacked block's slice: [depth]. Summed over the trailing axes in place: a
  reshape that merged them would all-gather every fsdp-sharded gradient first."""
  leaves = jax.tree.leaves(blocks_tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)), tuple(range(1, x.ndim)))
                      for x in leaves))


def make_train_step(config, graphdef, tx, spec: Optional[workdir_lib.RunSpec] = None):
  """The jitted-to-be step (state, batch) -> (state, metrics). With ``spec``, the batch holds
  raw features in their stored dtype and the step maps them into the model's space itself
  (the statistics and the linear map are constants of the program); without, the batch is
  already in the model's space (the benchmark, tests)."""
  velocity = sampling.make_velocity(graphdef)
  accum = config.train.grad_accum
  seed = config.seed
  skip_nonfinite = config.train.skip_nonfinite
  ema_decay = config.train.ema_decay

  objective = config.flow.objective

  def loss_fn(params, source, x1, t, end, noise, drop):
    if objective == "meanflow":
      model = nnx.merge(graphdef, params)
      inputs, prior, prior_std = sampling.model_inputs(source)
      context = model.source_context(inputs, drop, prior, prior_std)
      with model_lib.forward_mode_kernels():
        pred, target = flow.meanflow_target(
            lambda x, t, s: model.velocity(x, t, context, s), noise, x1, t, end)
      per_example = flow.per_example_loss(pred, target)
      weights = flow.adaptive_weights(per_example, config.flow.adaptive_power)
      weighted = config.flow.loss_scale * jnp.mean(weights * per_example)
      # The gradient of the weighted loss, the value of the plain one (what train/loss logs).
      sg = jax.lax.stop_gradient
      loss = weighted - sg(weighted) + sg(config.flow.loss_scale * jnp.mean(per_example))
    else:
      x, time, target = flow.training_pair(objective, noise, x1, t)
      pred = velocity(params, x, time, source, drop)
      loss = flow.loss(pred, target, config.flow.loss_scale)
      per_example = flow.per_example_loss(pred, target)   # for the time buckets
    p, v = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    cos = jnp.sum(p * v, -1) / jnp.maximum(
        jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(v, axis=-1), 1e-12)
    return loss, (per_example, cos)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    if spec is None:
      source, x1 = {"source": batch["source"]}, batch["target"]
    else:
      source, x1 = spec.condition(batch["source"]), spec.encode_target(batch["target"])
    t, end, noise, drop = _per_example(key, x1, config)
    if accum == 1:
      (loss, (per_example, cos)), grads = grad_fn(params, source, x1, t, end, noise, drop)
    else:
      # Interleaved micro-batches (rows i, i + accum, ...) keep every device's rows local.
      split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
      micro = jax.tree.map(split, (source, x1, t, end, noise, drop))

      def body(grads, mb):
        (l, aux), g = grad_fn(params, *mb)
        return jax.tree.map(jnp.add, grads, g), (l, aux)
      zeros = jax.tree.map(jnp.zeros_like, params)
      grads, (losses, (per_ex, coss)) = jax.lax.scan(body, zeros, micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = jnp.mean(losses)
      unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1)
      per_example, cos = unsplit(per_ex), unsplit(coss)

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    step = state["step"]
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], new_params)

    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state, "ema": ema}
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {"step": step + 1, "params": keep(new_params, params),
                   "opt_state": keep(opt_state, state["opt_state"]),
                   "ema": keep(ema, state["ema"])}

    param_norm = _global_norm(params)
    buckets = jnp.clip((t * 4).astype(jnp.int32), 0, 3)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "param_norm": param_norm,
        "update_ratio": _global_norm(updates) / jnp.maximum(param_norm, 1e-12),
        # Of the conditioned rows only: a dropped row is asked for another velocity.
        "velocity_cosine": jnp.sum(jnp.where(drop, 0.0, cos)) / jnp.maximum(
            jnp.sum(~drop), 1),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        "grad_norm_blocks": _per_block_norm(grads["blocks"]),
    }
    for q in range(4):
      mask = (buckets == q).astype(jnp.float32)
      metrics[f"loss_t{q}_sum"] = jnp.sum(per_example * mask)
      metrics[f"loss_t{q}_count"] = jnp.sum(mask)
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------- logging

class MetricWriter:
  """metrics.jsonl + TensorBoard (+ W&B when configured); writes on process 0 only."""

  def __init__(self, workdir: str, config, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    self.wandb = None
    if not enabled:
      return
    self.tb = data_lib.tensorflow().summary.create_file_writer(workdir)
    if config.wandb.project:
      import wandb
      self.wandb = wandb.init(project=config.wandb.project, dir=workdir,
                              config=config.to_dict(), resume="allow",
                              id=_wandb_id(workdir))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled or not scalars:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    tf = data_lib.tensorflow()
    with self.tb.as_default(step=int(step)):
      for k, v in scalars.items():
        tf.summary.scalar(k, v)
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(scalars, step=int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def _wandb_id(workdir: str) -> str:
  path = os.path.join(workdir, "wandb_id")
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write(os.urandom(6).hex())
  with open(path) as f:
    return f.read().strip()


def summarise(window: list[dict], depth: int) -> dict:
  """Mean of the fetched per-step metrics over a logging window, as `train/...` scalars."""
  out = {}
  for k in ("loss", "grad_norm", "param_norm", "update_ratio", "velocity_cosine"):
    out[f"train/{k}"] = float(np.mean([m[k] for m in window]))
  out["train/nonfinite_steps"] = float(np.sum([m["nonfinite"] for m in window]))
  blocks = np.mean([m["grad_norm_blocks"] for m in window], 0)
  for i in range(depth):
    out[f"train/grad_norm_block{i:02d}"] = float(blocks[i])
  for q in range(4):
    n = np.sum([m[f"loss_t{q}_count"] for m in window])
    if n:
      s = np.sum([m[f"loss_t{q}_sum"] for m in window])
      out[f"train/loss_t{q * 25:02d}_{(q + 1) * 25:02d}"] = float(s / n)
  return out


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class TrainSetup:
  """What training is made of before it holds any array: the mesh, the data, the run's
  spec, the model's graphdef, the optimizer, and the train state's shapes and shardings.

  The train state itself is always one pytree {"step", "params", "opt_state", "ema"};
  ``abstract_state`` is its ShapeDtypeStructs (with shardings), which a resumed run restores
  straight into, and ``init`` builds a fresh one, called only when there is nothing to
  resume."""
  config: Any
  workdir: str
  mesh: Any
  data_dir: str
  spec: workdir_lib.RunSpec
  graphdef: Any
  tx: Any
  abstract_state: Any
  state_shardings: Any
  checkpointer: checkpoint_lib.Checkpointer
  init: Any
  train_split: str = "train"   # with train.select_rows: the rows not held out ...
  select_split: str = ""       # ... and the held-out ones

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def setup(config, workdir: str) -> TrainSetup:
  workdir_lib.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  n_dev = mesh.devices.size
  if config.train.batch_size % n_dev or (config.train.batch_size // config.train.grad_accum) % n_dev:
    raise ConfigError(f"train.batch_size {config.train.batch_size} (micro-batch "
                      f"{config.train.batch_size // config.train.grad_accum}) must be divisible "
                      f"by the {n_dev} devices")
  data_dir, stats = workdir_lib.resolve_data(config, workdir)
  spec = workdir_lib.spec_from_config(config, stats)
  splits = ("train", "")
  if config.train.select_rows:   # checked against the dataset before any work
    splits = workdir_lib.selection_splits(data_dir, config.train.select_rows)
  elif not config.data.overfit_size and jax.process_index() == 0:
    rows = data_lib.split_size(data_dir, "train")
    if rows < SMALL_DATA_ROWS:
      print(f"note: {rows:,} training rows; with few rows the network can overfit before "
            f"it improves on its prior: train.select_rows={min(max(rows // 10, 1), 2000)} "
            f"keeps the best step, the prior itself included (README: 'Small data')",
            flush=True)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  if checkpointer.latest_step() is not None:
    spec = workdir_lib.resumed_spec(config, workdir, spec)
  if spec.model_cfg.prior and spec.estimate is None:
    spec = workdir_lib.fit_prior(config, data_dir, workdir, spec)
    if jax.process_index() == 0:
      mlp = (f", the MLP's {spec.mlp.held_out_mse:.4g}" if spec.mlp is not None else "")
      print(f"prior: the {'MLP' if spec.prior == 'mlp' else 'linear map'} (held-out MSE: the "
            f"linear map's {spec.linear.held_out_mse:.4g}{mlp})", flush=True)
  tx = make_optimizer(config)
  # Shapes only: a resumed run restores straight into its shardings, so the state is never
  # held twice; a new run creates it in train_and_evaluate.
  graphdef, init, shapes = abstract_state(spec.model_cfg, tx, config.seed)
  shardings = sharding.state_shardings(shapes, mesh)
  workdir_lib.write_run_files(workdir, config, data_dir, spec)
  return TrainSetup(config, workdir, mesh, data_dir, spec, graphdef, tx,
                    sharding.placed(shapes, mesh), shardings, checkpointer, init, *splits)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) and returns the last eval."""
  from tqdm import tqdm
  run = setup(config, workdir)
  c = config
  mesh = run.mesh

  # -- checkpoint: resume where the workdir left off
  restored_step, state = run.checkpointer.restore_latest_valid(run.abstract_state)
  start = restored_step or 0
  if restored_step is None:
    state = jax.jit(run.init, out_shardings=run.state_shardings)()
  elif run.is_main:
    print(f"resuming from step {start} ({run.checkpointer.directory})", flush=True)
  if start >= c.train.steps:
    logging.info("already trained for %d steps", start)

  # -- input: this process's rows of every global batch, resumed at `start`; process p
  # holds the p-th block of rows (sharding.make_mesh orders the devices by process)
  selector = None
  batches = data_lib.train_batches(
      run.data_dir, run.train_split, [c.data.source, c.data.target], c.train.batch_size,
      seed=c.seed, limit=c.data.overfit_size, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count(),
      in_memory_bytes=int(c.data.in_memory_gb * 2 ** 30),
      shuffle_buffer_bytes=int(c.data.shuffle_buffer_mb * 2 ** 20))

  # -- the compiled step: state donated, shardings explicit
  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(c, run.graphdef, run.tx, run.spec),
                    in_shardings=(run.state_shardings, {"source": batch_shard,
                                                        "target": batch_shard}),
                    out_shardings=(run.state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  evaluator = evaluate_lib.make_evaluator(c, workdir, run.data_dir, run.spec, run.graphdef,
                                          mesh)
  if c.train.select_rows:
    selector = evaluate_lib.Selector(c, workdir, run.data_dir, run.spec, run.graphdef, mesh,
                                     run.select_split)
    if start == 0:
      selector.update(0, state)   # the untrained model: the linear map
  writer = MetricWriter(workdir, c, enabled=run.is_main)
  schedule = learning_rate(c)

  window, last_eval = [], {}
  pending = None   # the newest step's metrics, fetched once the next step is dispatched
  skipped_in_a_row = 0
  last_saved = start
  t_window = time.perf_counter()
  bar = tqdm(total=c.train.steps, initial=start, disable=not run.is_main, mininterval=5,
             desc="train", unit="step", dynamic_ncols=True)

  preemption = PreemptionWatcher()

  def flush() -> None:
    """Fetches the pending step's metrics: stops on a non-finite step, else keeps them for
    the logging window."""
    nonlocal pending, skipped_in_a_row
    if pending is None:
      return
    step_done, metrics = pending
    pending = None
    m = jax.device_get(metrics)
    if m["nonfinite"]:
      if not c.train.skip_nonfinite:
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step_done}; the last good checkpoint is "
            f"step {last_saved} in {run.checkpointer.directory} (rerun to resume from it, "
            "lower train.lr, or set train.skip_nonfinite=True)")
      skipped_in_a_row += 1
      if skipped_in_a_row > c.train.max_nonfinite_in_a_row:
        raise NonFiniteError(f"{skipped_in_a_row} non-finite steps in a row up to step "
                             f"{step_done}; stopping")
    else:
      skipped_in_a_row = 0
    window.append(m)

  try:
    for step in range(start, c.train.steps):
      batch = next(batches)
      batch = sharding.global_batch({"source": batch[c.data.source],
                                     "target": batch[c.data.target]}, mesh)
      with jax.transfer_guard("disallow"):   # everything the step takes is already placed
        state, metrics = step_fn(state, batch)
      flush()   # the previous step's metrics, while this one runs
      pending = (step + 1, metrics)
      done = step + 1
      if done % c.train.log_every == 0 or done == c.train.steps:
        flush()
        elapsed = time.perf_counter() - t_window
        scalars = summarise(window, run.spec.model_cfg.depth)
        scalars["perf/steps_per_s"] = len(window) / elapsed
        scalars["perf/samples_per_s"] = len(window) * c.train.batch_size / elapsed
        scalars["train/lr"] = float(schedule(done))
        writer.write(done, scalars)
        bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                        vcos=f"{scalars['train/velocity_cosine']:.3f}")
        window = []
        t_window = time.perf_counter()
      bar.update(1)
      if done % c.train.eval_every == 0 or done == c.train.steps:
        flush()
        last_eval = evaluator.run(c, workdir, state, done)
        if selector is not None:
          last_eval.update(selector.update(done, state))
        writer.write(done, last_eval)
        if run.is_main:
          bar.write(f"step {done}: {plots.summary(last_eval, c.eval.mode)}")
          plots.plot_training(workdir)
      stop = preemption.reached(done)
      if done % c.train.checkpoint_every == 0 or done == c.train.steps or stop:
        flush()
        run.checkpointer.save(done, state, force=done == c.train.steps or stop)
        last_saved = done
      if stop:
        run.checkpointer.wait()
        raise Preempted(f"stopped by {preemption.signal_name} at step {done}; checkpoint "
                        f"{done} saved in {run.checkpointer.directory}; run the same command "
                        "again to resume")
    flush()
    if selector is not None and last_eval:
      selected = selector.report(c, evaluator, run.abstract_state["ema"])
      last_eval.update(selected)
      writer.write(c.train.steps, selected)
      if run.is_main:
        bar.write(f"selected (step {selected['select/step']}): " + " | ".join(
            f"{mode}: " + " ".join(f"{k}={selected[f'eval/selected/{mode}/{k}']:.4f}"
                                   for k in ("cosine_token", "mse"))
            for mode in ("sample", "mean")))
  finally:
    preemption.close()
    bar.close()
    run.checkpointer.close()
    writer.close()
  if not last_eval and start >= c.train.steps:
    last_eval = evaluator.run(c, workdir, state, start)
    if selector is not None:   # a finished run, run again: the kept weights' figures too
      last_eval.update(selector.report(c, evaluator, run.abstract_state["ema"]))
  return last_eval

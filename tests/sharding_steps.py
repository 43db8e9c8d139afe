"""Runs the train step of a tiny model on 8 CPU devices in several layouts; test_sharding.py
reads what it writes. A script of its own because the device count is fixed once JAX starts.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_steps.py OUT_DIR

Every layout takes the same two batches from the same initial state: made once on one device
and copied into each layout's shardings, except that the fsdp layout creates its own with
train.create_state (a jitted init straight into the shardings) to show it is the same.
OUT_DIR receives results.npz (initial, created and final states and losses, flattened by
path), results.json (shardings, shard shapes, donation, compilations) and to_one/ (the fsdp
layout's final state, checkpointed from 8 devices). When OUT_DIR/from_one/ holds a
checkpoint saved on one device, it is restored onto the fsdp layout as well."""

import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402
from flowmap import checkpoint as checkpoint_lib  # noqa: E402
from flowmap import model as model_lib  # noqa: E402
from flowmap import sharding  # noqa: E402
from flowmap import train  # noqa: E402

SOURCE_SHAPE, TARGET_SHAPE = (16, 48), (16, 32)
BATCH = 32
LAYOUTS = {   # name: (mesh data, mesh fsdp, devices used, grad_accum)
    "one": (1, 1, 1, 1),
    "data8": (8, 1, 8, 1),
    "fsdp": (2, 4, 8, 1),
    "fsdp_accum4": (2, 4, 8, 4),
}


def config(accum: int = 1):
  c = tiny_config()
  c.train.batch_size = BATCH
  c.train.grad_accum = accum
  c.flow.cond_dropout = 0.25   # exercise the per-example dropout draws too
  c.model.prior = "none"   # batches of random model inputs: no fitted prior
  return c


def flat(tree, prefix=""):
  # A copy: a live zero-copy view of a CPU buffer would stop the step from donating it.
  return {prefix + jax.tree_util.keystr(k): np.array(v, copy=True)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def specs(tree):
  return {jax.tree_util.keystr(k): [str(a) for a in v.sharding.spec]
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def main(out_dir: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batches = [{"source": rng.normal(size=(BATCH, *SOURCE_SHAPE)).astype(np.float32),
              "target": rng.normal(size=(BATCH, *TARGET_SHAPE)).astype(np.float32)}
             for _ in range(2)]
  model_cfg = model_lib.config_from(config().model, SOURCE_SHAPE, TARGET_SHAPE)
  tx = train.make_optimizer(config())
  one = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}),
                           jax.devices()[:1])
  graphdef, initial, _ = train.create_state(model_cfg, tx, 0, one)
  initial = jax.device_get(initial)
  arrays, report = flat(initial, "initial/"), {"layouts": {}}

  for name, (data, fsdp, n_dev, accum) in LAYOUTS.items():
    c = config(accum)
    c.mesh.data, c.mesh.fsdp = data, fsdp
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:n_dev])
    _, _, shapes = train.abstract_state(model_cfg, tx, 0)
    shardings = sharding.state_shardings(shapes, mesh)
    if name == "fsdp":   # the real path: created on the mesh by a jitted init
      _, state, shardings = train.create_state(model_cfg, tx, 0, mesh)
      arrays.update(flat(state, "created/"))
    else:
      state = jax.device_put(initial, shardings)
    batch_shard = sharding.batch_sharding(mesh)
    step = jax.jit(train.make_train_step(c, graphdef, tx),
                   in_shardings=(shardings, {"source": batch_shard, "target": batch_shard}),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    losses, donated, kept = [], True, True
    for b in batches:
      old, batch = state, sharding.global_batch(b, mesh)
      with jax.transfer_guard("disallow"):   # as in train.py: no silent host copies
        state, metrics = step(old, batch)
      losses.append(float(metrics["loss"]))
      donated &= all(x.is_deleted() for x in jax.tree.leaves(old))
      kept &= all(x.sharding == s for x, s in
                  zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    arrays[f"{name}/losses"] = np.asarray(losses)
    arrays.update(flat(state, f"{name}/state"))
    report["layouts"][name] = {
        "mesh": dict(mesh.shape), "donated": bool(donated), "shardings_kept": bool(kept),
        "compilations": step._cache_size(), "specs": specs(state),
        "shard_shapes": {jax.tree_util.keystr(k): list(v.addressable_shards[0].data.shape)
                         for k, v in jax.tree_util.tree_leaves_with_path(state)}}
    if name == "fsdp":
      ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, "to_one"))
      ckpt.save(2, state, force=True)
      ckpt.close()
      from_one = os.path.join(out_dir, "from_one")
      if os.path.isdir(os.path.join(from_one, "checkpoints")):
        reader = checkpoint_lib.Checkpointer(from_one, read_only=True)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
            shardings)
        _, restored = reader.restore(abstract)
        reader.close()
        arrays.update(flat(restored, "restored/"))
        report["restored_specs"] = specs(restored)

  np.savez(os.path.join(out_dir, "results.npz"), **arrays)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  main(sys.argv[1])

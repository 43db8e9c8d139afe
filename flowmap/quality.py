"""python -m flowmap.quality: flowmap against the closed-form linear map on synthetic pairs.

For every synthetic grid task (equal grids, a finer and a coarser source grid, patch tokens to
a pooled embedding, pooled to pooled; flowmap/synthetic.py) and every training-set size, it
writes the dataset, trains ``--config`` on it (resumably: run it again to finish), and
prints one markdown table: flowmap's mean mode (the fair pointwise comparison), at the last
step and at the step chosen on held-out training rows (``train.select_rows``), against the
ridge map, the MLP and the mean target on ``cosine_token``, ``mse`` and ``recall_at_1``, with
the sample mode beside it. Every figure is on 512 held-out images of the task.

The spread tasks (``--tasks spread``: targets that spread around a source-determined centre
in directions the source does not show, with several modes, on a sphere, per token, shared
by the tokens, shared through position-specific maps) get a second table: what the samples
are worth as a distribution, the variance ratio along the spread directions (1 when the
spread is kept, near 0 for any regressor), the overall variance ratio and the pooled and
per-token Frechet distances, for flowmap's samples and mean against the ladder's rungs.

  python -m flowmap.quality --out runs/quality [--sizes 2000] [--tasks grid_equal,...|grid|spread]
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)   # config files import `configs.default`

FLAGS = flags.FLAGS

FIGURES = ("cosine_token", "mse", "recall_at_1")
SPREAD_FIGURES = ("variance_ratio_along", "variance_ratio", "fd_pooled", "fd_tokens")
SPREAD_COLUMNS = (("flowmap sample", "eval/sample/"), ("flowmap mean", "eval/mean/"),
                  ("ridge", "baseline/ridge_"), ("mlp", "baseline/mlp_"),
                  ("mean target", "baseline/mean_"))
COLUMNS = (("flowmap mean", "eval/mean/"), ("flowmap selected mean", "eval/selected/mean/"),
           ("ridge", "baseline/ridge_"),
           ("mlp", "baseline/mlp_"), ("mean target", "baseline/mean_"),
           ("flowmap sample", "eval/sample/"))


def run_one(config, out: str, task: str, size: int) -> dict:
  from flowmap import synthetic, train
  data_dir = os.path.join(out, "data", f"{task}-{size}")
  synthetic.write_task(data_dir, task, train_size=size, validation_size=512)
  c = config.copy_and_resolve_references()
  c.data.dir = data_dir
  c.data.source, c.data.target = synthetic.SOURCE, synthetic.TARGET
  results = train.train_and_evaluate(c, os.path.join(out, "runs", f"{task}-{size}"))
  keys = {prefix + k for _, prefix in COLUMNS for k in FIGURES}
  keys |= {prefix + k for _, prefix in SPREAD_COLUMNS for k in SPREAD_FIGURES}
  return {"task": task, "rows": size,
          **{k: results[k] for k in sorted(keys) if k in results},
          **({"select/step": results["select/step"]} if "select/step" in results else {})}


def table(rows: list[dict], figures=FIGURES, columns=COLUMNS, selected: bool = True) -> str:
  """A markdown table: one line per row, one cell per (figure, column); "-" where missing."""
  head = ["task", "train rows"] + (["selected step"] if selected else [])
  head += [f"{name} {k}" for k in figures for name, _ in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["task"], f"{r['rows']:,}"] + ([str(r.get("select/step", "-"))] if selected
                                              else [])
    for k in figures:
      for name, prefix in columns:
        v = r.get(prefix + k)
        cells.append("-" if v is None else f"{v:.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def spread_table(rows: list[dict]) -> str:
  """The distribution-level table of the spread tasks' rows (empty when there are none)."""
  spread = [r for r in rows if r["task"].startswith("spread_")]
  return table(spread, SPREAD_FIGURES, SPREAD_COLUMNS, selected=False) if spread else ""


def resolve_tasks(names: list[str]) -> list[str]:
  """Task names, with ``grid`` and ``spread`` standing for their groups (default: grid)."""
  from flowmap import synthetic
  tasks = []
  for name in names or ["grid"]:
    group = {"grid": synthetic.GRID_TASKS, "spread": synthetic.SPREAD_TASKS}.get(name)
    for task in group or [name]:
      if task not in synthetic.TASKS:
        raise app.UsageError(f"unknown task {task!r}; choose grid, spread or one of "
                             f"{', '.join(synthetic.TASKS)}")
      if task not in tasks:
        tasks.append(task)
  return tasks


def _define_flags():
  """The command line's flags, defined only when this module runs as the program (importing
  it for ``table`` defines nothing in absl's global registry)."""
  config = config_flags.DEFINE_config_file(
      "config", os.path.join(HERE, "configs", "quality.py"), "ml_collections config file.",
      lock_config=False)
  flags.DEFINE_string("out", "runs/quality", "Where the datasets, the runs and quality.json go.")
  flags.DEFINE_list("sizes", ["2000"], "Training-set sizes.")
  flags.DEFINE_list("tasks", [], "Tasks of flowmap.synthetic, or grid / spread for a group "
                    "(default: grid).")
  return config


def main(argv, config):
  del argv
  tasks = resolve_tasks(FLAGS.tasks)
  rows = [run_one(config.value, FLAGS.out, task, int(size))
          for task in tasks for size in FLAGS.sizes]
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "quality.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(table(rows))
  if spread_table(rows):
    print("\nWhat the samples are worth on the spread tasks (every column on the same "
          "held-out images; variance ratios near 1 and low Frechet distances are faithful):")
    print(spread_table(rows))


if __name__ == "__main__":
  _config = _define_flags()
  app.run(lambda argv: main(argv, _config))

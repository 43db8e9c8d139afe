"""Plots a person would rather look at than read, and the console table of --mode eval.

  plots/training.png    loss, velocity cosine and held-out cosine against steps
  plots/sweep.png       held-out figures against model evaluations, per solver
"""

from __future__ import annotations

import os
from typing import Sequence

from flowmap.metrics import METRICS
from flowmap.workdir import read_metrics


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_training(workdir: str) -> str:
  """plots/training.png: training loss and velocity cosine; the held-out cosine of samples
  and of the mean over steps, with the baselines' cosines for reference."""
  plt = _pyplot()
  rows = read_metrics(workdir)
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  series = [("train/loss", axes[0], "loss"),
            ("train/velocity_cosine", axes[1], "velocity cosine (model space)"),
            ("eval/sample/cosine_token", axes[2], "held-out cosine_token")]
  for key, ax, title in series:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  for key, style in (("eval/mean/cosine_token", "-"), ("baseline/ridge_cosine_token", "--"),
                     ("baseline/mlp_cosine_token", "-."), ("baseline/mean_cosine_token", ":")):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      axes[2].plot(*zip(*pts), style, marker="o" if style == "-" else None, label=key)
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  path = os.path.join(workdir, "plots", "training.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


SWEEP_PANELS = (("cosine_token", "pointwise: rewards the mean"),
                ("mse", "pointwise: rewards the mean"),
                ("fd_pooled", "distribution: lower is more faithful"),
                ("variance_ratio", "distribution: 1 is the true spread"))


def _curve_label(row: dict) -> str:
  g = row["guidance"]
  return (f"{row['solver']}" if row["mode"] == "sample" else "mean") + \
      (f" g={g:g}" if g != 1.0 else "")


def plot_sweep(workdir: str, step: int, sweep: Sequence[dict], baseline: dict) -> str:
  """plots/sweep_<step>.png (and a copy as plots/sweep.png): pointwise and distribution
  figures against model evaluations per solver; the mean mode as a star at one evaluation;
  EMA solid, raw weights dashed; baselines as horizontal lines."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(5 * len(SWEEP_PANELS), 4.2))
  colours = {"euler": "tab:blue", "heun": "tab:orange"}
  curves = sorted({(r["weights"], r["mode"], r["solver"], r["guidance"]) for r in sweep},
                  key=lambda k: (k[0] != "ema", k[1], k[2], k[3]))
  for ax, (metric, what) in zip(axes, SWEEP_PANELS):
    for weights, mode, solver, guidance in curves:
      rows = [r for r in sweep
              if (r["weights"], r["mode"], r["solver"], r["guidance"]) ==
              (weights, mode, solver, guidance) and metric in r]
      if not rows:
        continue
      pts = sorted((r["evaluations"], r[metric]) for r in rows)
      label = f"{_curve_label(rows[0])} ({weights})"
      style = "-" if weights == "ema" else "--"
      if mode == "mean":
        ax.plot(*zip(*pts), "*", markersize=11, color="tab:green",
                alpha=1.0 if weights == "ema" else 0.5, label=label)
        continue
      ax.plot(*zip(*pts), style, marker="o", markersize=3, color=colours.get(solver),
              alpha=1.0 if guidance == 1.0 else 0.6,
              linewidth=1.6 if weights == "ema" else 1.0, label=label)
    for name, line in (("ridge", "--"), ("mlp", "-."), ("mean", ":")):
      key = f"baseline/{name}_{metric}"
      if key in baseline:
        ax.axhline(baseline[key], color="k", linestyle=line, linewidth=1,
                   label=f"{name} baseline {baseline[key]:.3g}")
    if metric == "variance_ratio":
      ax.axhline(1.0, color="tab:green", linewidth=0.8, alpha=0.5)
    if metric in ("mse", "fd_pooled"):
      ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["evaluations"] for r in sweep})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("model evaluations per sample")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at step {step}\n({what})", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  path = os.path.join(plots, f"sweep_{step}.png")
  fig.savefig(path, dpi=100)
  fig.savefig(os.path.join(plots, "sweep.png"), dpi=100)
  plt.close(fig)
  return path


TABLE_METRICS = ("cosine_token", "mse", "r2", "recall_at_1", "fd_pooled", "variance_ratio")


def format_table(step: int, record: dict) -> str:
  """The table --mode eval prints: every output (the mean, samples per solver and evaluation
  count) of the EMA weights against the baselines, pointwise and distribution figures side
  by side (eval/<step>.json also holds the raw weights' rows and every other figure)."""
  width = max(12, 2 + max(len(m) for m in TABLE_METRICS))   # a space between every header
  head = "".join(f"{m:>{width}}" for m in TABLE_METRICS)
  lines = [f"step {step}: {record['num_images']} held-out images, EMA weights. Pointwise "
           "figures reward the mean; fd_pooled and variance_ratio a faithful sampler",
           f"{'output':<36}{head}"]

  def row(label, figures):
    cells = "".join(f"{figures[m]:>{width}.4f}" if m in figures else f"{'-':>{width}}"
                    for m in TABLE_METRICS)
    return f"{label:<36}{cells}"

  ema = [r for r in record["sweep"] if r["weights"] == "ema"]
  ema.sort(key=lambda r: (r["guidance"], r["mode"] != "mean", r["solver"], r["evaluations"]))
  for r in ema:
    label = (f"mean, {r['evaluations']} evals" if r["mode"] == "mean" else
             f"{r['solver']}, {r['evaluations']} eval" + ("s" if r["evaluations"] > 1 else ""))
    if r["guidance"] != 1.0:
      label += f" g={r['guidance']:g}"
    lines.append(row(label, r))
  for name, label in (("ridge", f"ridge ({record.get('ridge_kind', '?')})"),
                      ("procrustes", "procrustes"), ("mlp", "mlp"), ("mean", "mean target")):
    figures = {m: record[f"baseline/{name}_{m}"] for m in TABLE_METRICS
               if f"baseline/{name}_{m}" in record}
    if figures:
      lines.append(row(f"baseline: {label}", figures))
  b = record
  lines.append(f"configured ({b['mode']}; {b['solver']}, {b['evaluations']} evaluations, "
               f"guidance {b['guidance']:g}): " + "  ".join(
                   f"{k}={b['eval/' + k]:.4f}" for k in (*METRICS, "velocity_cosine")
                   if "eval/" + k in b))
  for k in ("energy_score", "spread_skill"):
    if f"eval/sample/{k}" in b:
      lines[-1] += f"  sample/{k}={b[f'eval/sample/{k}']:.4f}"
  return "\n".join(lines)


SUMMARY_METRICS = ("cosine_token", "mse", "r2", "recall_at_1", "fd_pooled", "variance_ratio")


def summary(results: dict, mode: str) -> str:
  """One line for the console: the configured output, the other output, and the baselines
  on the same held-out rows, each named by what it is."""
  parts = []
  for label, prefix in ((mode, "eval/"),
                        *((other, f"eval/{other}/") for other in ("sample", "mean")
                          if other != mode),
                        ("ridge", "baseline/ridge_"), ("mlp", "baseline/mlp_"),
                        ("mean target", "baseline/mean_")):
    figures = [f"{k}={results[prefix + k]:.4f}" for k in SUMMARY_METRICS
               if isinstance(results.get(prefix + k), float)]
    if figures:
      parts.append(f"{label}: " + " ".join(figures))
  return " | ".join(parts)

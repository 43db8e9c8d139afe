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
  """plots/training.png: training loss and velocity cosine, held-out cosine over steps with
  the baselines' cosines for reference."""
  plt = _pyplot()
  rows = read_metrics(workdir)
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  series = [("train/loss", axes[0], "loss"), ("train/velocity_cosine", axes[1], "velocity cosine"),
            ("eval/cosine_token", axes[2], "held-out cosine")]
  for key, ax, title in series:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  for key, style in (("eval/cosine_global", "-"), ("baseline/ridge_cosine_token", "--"),
                     ("baseline/mean_cosine_token", ":")):
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


def plot_sweep(workdir: str, step: int, sweep: Sequence[dict], baseline: dict) -> str:
  """plots/sweep_<step>.png (and a copy as plots/sweep.png): cosine against model
  evaluations per solver; EMA solid, raw weights dashed, baselines as horizontal lines."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  colours = {"euler": "tab:blue", "heun": "tab:orange"}
  curves = sorted({(r["weights"], r["solver"], r["guidance"]) for r in sweep},
                  key=lambda k: (k[0] != "ema", k[1], k[2]))
  for ax, metric in zip(axes, ("cosine_token", "cosine_global")):
    for weights, solver, guidance in curves:
      pts = sorted((r["evaluations"], r[metric]) for r in sweep
                   if (r["weights"], r["solver"], r["guidance"]) == (weights, solver, guidance))
      label = f"{solver} ({weights})" + (f" g={guidance:g}" if guidance != 1.0 else "")
      ax.plot(*zip(*pts), "-" if weights == "ema" else "--", marker="o", markersize=3,
              color=colours.get(solver), alpha=1.0 if guidance == 1.0 else 0.6,
              linewidth=1.6 if weights == "ema" else 1.0, label=label)
    for name, style in (("ridge", "k--"), ("mean", "k:")):
      key = f"baseline/{name}_{metric}"
      if key in baseline:
        ax.axhline(baseline[key], color="k", linestyle=style[1:], linewidth=1,
                   label=f"{name} baseline {baseline[key]:.3f}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["evaluations"] for r in sweep})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("model evaluations per sample")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at step {step}")
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


def format_table(step: int, record: dict) -> str:
  """The short table --mode eval prints: cosine_token per solver and evaluation count."""
  sweep = record["sweep"]
  columns = sorted({(r["solver"], r["guidance"]) for r in sweep}, key=lambda k: (k[1], k[0]))
  header = ["evals"] + [f"{s}" + (f" g={g:g}" if g != 1.0 else "") + " ema/raw"
                        for s, g in columns]
  lines = [f"step {step}: cosine_token on {record['num_images']} held-out images",
           "  ".join(f"{h:>18}" if i else f"{h:>5}" for i, h in enumerate(header))]
  by_key = {(r["weights"], r["solver"], r["guidance"], r["evaluations"]): r for r in sweep}
  for n in sorted({r["evaluations"] for r in sweep}):
    cells = [f"{n:>5}"]
    for s, g in columns:
      ema, raw = by_key.get(("ema", s, g, n)), by_key.get(("raw", s, g, n))
      cells.append(f"{ema['cosine_token']:.4f}/{raw['cosine_token']:.4f}".rjust(18)
                   if ema and raw else "-".rjust(18))
    lines.append("  ".join(cells))
  b = record
  lines.append(f"baselines: ridge ({b.get('ridge_kind', '?')}) "
               f"{b['baseline/ridge_cosine_token']:.4f}  mean target "
               f"{b['baseline/mean_cosine_token']:.4f}")
  lines.append(f"configured ({b['solver']}, {b['evaluations']} evaluations, guidance "
               f"{b['guidance']:g}): " + "  ".join(
                   f"{k}={b['eval/' + k]:.4f}" for k in (*METRICS, "velocity_cosine")))
  return "\n".join(lines)

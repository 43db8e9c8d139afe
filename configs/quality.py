"""The quality table's training run: `python -m flowmap.quality` trains one per synthetic task
and training-set size (flowmap/synthetic.py), with the demo's tiny Next-DiT."""

from configs import demo


def get_config():
  c = demo.get_config()
  c.data.dir = "<written by flowmap.quality>"
  c.train.steps = 1000
  c.train.eval_every = 100      # each evaluation also scores the selection rows
  c.train.checkpoint_every = 500
  c.train.select_rows = 200     # a tenth of 2,000 rows held out to choose the step by
  c.eval.num_images = 512
  return c

"""The first check on any new setup: 10 examples must be learned almost exactly."""

from configs import demo


def get_config():
  c = demo.get_config()
  c.data.overfit_size = 10
  c.train.steps = 1000
  c.train.batch_size = 10
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.eval.num_images = 10
  return c

"""The demo: the embedded synthetic dataset, a tiny Next-DiT, a few minutes on two CPU cores."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dir = ""               # empty: write the synthetic dataset into <workdir>/data
  c.data.source = "source_enc"
  c.data.target = "target_enc"
  c.model.size = "tiny"
  c.model.aligned_conditioning = True
  c.flow.cond_dropout = 0.0
  c.train.steps = 1000
  c.train.batch_size = 64
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.ema_decay = 0.995
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.eval.num_images = 512
  c.eval.steps = 8
  return c

"""EVA02-CLIP-L/14 patch tokens -> CLIP ViT-L/14 patch tokens (both 256 x 1024 at 224 px).

Expects a features dataset extracted with
  --encoder clip=hf:openai/clip-vit-large-patch14
  --encoder eva=timm:eva02_large_patch14_clip_224.merged2b
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dir = "data/feats"
  c.data.source = "eva"
  c.data.target = "clip"
  c.data.source_shape = (256, 1024)
  c.data.target_shape = (256, 1024)
  c.model.size = "base"
  c.train.steps = 200_000
  c.train.batch_size = 256
  c.train.lr = 3e-4
  c.train.warmup_steps = 2000
  return c

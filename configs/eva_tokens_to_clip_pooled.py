"""EVA02-CLIP-L/14 patch tokens (256 x 1024) -> CLIP ViT-L/14 image embedding (1 x 768).

Expects a features dataset extracted with
  --encoder clip_pooled=hf:openai/clip-vit-large-patch14,tokens=pooled
  --encoder eva=timm:eva02_large_patch14_clip_224.merged2b
The one target token reads every source token through cross-attention; the aligned path
gives it the mean source token and the linear prior the closed-form map from the resampled
(mean) source.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dir = "data/feats"
  c.data.source = "eva"
  c.data.target = "clip_pooled"
  c.data.source_shape = (256, 1024)
  c.data.target_shape = (1, 768)
  c.model.size = "small"
  c.train.steps = 50_000
  c.train.batch_size = 512
  c.train.lr = 3e-4
  c.train.warmup_steps = 1000
  return c

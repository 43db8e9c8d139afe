"""CLIP ViT-L/14 patch tokens -> EVA02-CLIP-L/14 patch tokens: the reverse of eva_to_clip."""

from configs import eva_to_clip


def get_config():
  c = eva_to_clip.get_config()
  c.data.source, c.data.target = "clip", "eva"
  return c

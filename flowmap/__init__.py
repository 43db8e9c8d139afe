"""flowmap: learn a map between two vision encoders' embedding spaces with rectified flow.

  from flowmap import Mapper, load_features

Both names load on first use, so ``import flowmap`` costs nothing and sampling with a Mapper
never imports TensorFlow or PyTorch (reading a TFRecord dataset with ``load_features`` does
need TensorFlow).
"""

from flowmap import platform as _platform

_platform.set_xla_flags(warn=False)   # before JAX starts; see flowmap/platform.py

__all__ = ["Mapper", "load_features"]


def __getattr__(name):
  if name in __all__:
    from flowmap import mapper
    return getattr(mapper, name)
  raise AttributeError(f"module 'flowmap' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)

"""Images -> a features dataset: the extraction pipeline behind extract_features.py.

Data flows one way through the package, each module importing only those above it:

  errors     ExtractError, OutputError: what stops a run with one line and exit code 2
  inputs     input patterns -> input shards (a tar, a run of a folder's files) -> samples
  decoding   samples -> RGB images, resized and cropped once per geometry, and captions
  output     in --out: shards written in the background, their reports, the run records,
             write failures as one OutputError; the metadata once every shard is done
  pipeline   ExtractConfig; one input shard through decoding, encoders and writer; ``run``
"""

from flowmap.extract.decoding import SkipItem, decode_image, prepare
from flowmap.extract.errors import CONFIG_ERRORS, ExtractError, OutputError
from flowmap.extract.inputs import (IMAGE_EXTENSIONS, Sample, expand_braces, list_images,
                                    resolve_inputs)
from flowmap.extract.output import try_finalize
from flowmap.extract.pipeline import ExtractConfig, in_holdout, run

__all__ = ["CONFIG_ERRORS", "ExtractError", "OutputError", "IMAGE_EXTENSIONS", "Sample",
           "expand_braces", "list_images", "resolve_inputs", "SkipItem", "decode_image",
           "prepare", "try_finalize", "ExtractConfig", "in_holdout", "run"]

"""fastalign: fused kernels for fine-grained cross-modal alignment (image-text matching)."""

from fastalign import nn
from fastalign._backends import backends
from fastalign.ops.region_word import region_word_similarity

__version__ = "0.1.0"
__all__ = ["backends", "nn", "region_word_similarity"]

"""fastalign operators: each module holds its reference, dispatch and autograd."""

from fastalign.ops.region_word import region_word_similarity, region_word_similarity_reference

__all__ = ["region_word_similarity", "region_word_similarity_reference"]

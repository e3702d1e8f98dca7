"""fastalign operators: each module holds its reference, dispatch and autograd."""

from fastalign.ops.dimension_correlation import (
    dimension_correlation,
    dimension_correlation_loss,
    dimension_correlation_loss_reference,
    dimension_correlation_reference,
)
from fastalign.ops.prototypes import (
    prototype_assign,
    prototype_assign_reference,
    prototype_topk_mix,
    prototype_topk_mix_reference,
    prototype_update,
    prototype_update_reference,
)
from fastalign.ops.region_word import region_word_similarity, region_word_similarity_reference
from fastalign.ops.sparse_spatial import (
    sparse_select,
    sparse_spatial_loss,
    sparse_spatial_loss_reference,
)

__all__ = [
    "region_word_similarity",
    "region_word_similarity_reference",
    "dimension_correlation",
    "dimension_correlation_loss",
    "dimension_correlation_reference",
    "dimension_correlation_loss_reference",
    "sparse_select",
    "sparse_spatial_loss",
    "sparse_spatial_loss_reference",
    "prototype_assign",
    "prototype_assign_reference",
    "prototype_update",
    "prototype_update_reference",
    "prototype_topk_mix",
    "prototype_topk_mix_reference",
]

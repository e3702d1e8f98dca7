"""fastalign: fused kernels for fine-grained cross-modal alignment (image-text matching)."""

from fastalign import nn
from fastalign._backends import backends
from fastalign.evaluation import evaluate
from fastalign.ops._checks import set_finite_checks
from fastalign.ops.dimension_correlation import (
    dimension_correlation,
    dimension_correlation_loss,
)
from fastalign.ops.prototypes import prototype_assign, prototype_topk_mix, prototype_update
from fastalign.ops.region_word import region_word_similarity
from fastalign.ops.sparse_spatial import sparse_select, sparse_spatial_loss
from fastalign.retrieval import (
    evaluate_streaming,
    evaluate_streaming_folds,
    streaming_ranks,
    streaming_topk,
)

__version__ = "0.1.0"
__all__ = [
    "backends",
    "evaluate",
    "evaluate_streaming",
    "evaluate_streaming_folds",
    "streaming_ranks",
    "streaming_topk",
    "nn",
    "region_word_similarity",
    "dimension_correlation",
    "dimension_correlation_loss",
    "sparse_select",
    "sparse_spatial_loss",
    "prototype_assign",
    "prototype_update",
    "prototype_topk_mix",
    "set_finite_checks",
]

"""fastalign operators: each module holds its reference, dispatch and autograd.

Adding an operator: its line in fastalign._backends.OPERATOR_OPS (the public name and its ops,
the forward first); its schemas in csrc/schemas.h (listed in csrc/ops.cpp), its argument
checks in csrc/checks/<name>.h and kernels in csrc/cpu and csrc/cuda; one launcher per op in
fastalign/kernels/triton/<name>.py, named like the op, with aot_specs(); and
fastalign/ops/<name>.py with the reference, the argument checks (check_finite on every tensor
input, left to the C++ kernels on the cpu backend), typed fake kernels and one define_ops
(define_loss_ops for a loss that computes its gradient in the forward) call, which registers
fakes and autograd on both fast backends.
"""

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

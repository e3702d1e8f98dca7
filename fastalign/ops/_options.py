"""The option names of the operators; an option's integer code (what the compiled and Triton
ops take) is its index in its tuple. csrc/option_codes.h spells the same codes for C++, and
tests/test_option_codes.py fails when the two differ."""

DIRECTIONS = ("t2i", "i2t", "both")
ALIGNS = ("max", "lse")
AGGREGATES = ("mean", "sum", "max", "lse")
CORRELATION_MODES = ("barlow", "softmax")
CORRELATION_PATHS = ("auto", "correlation", "gram")
SPATIAL_KINDS = ("inter", "intra")
SPATIAL_SELECTS = ("threshold", "soft", "topk")
ASSIGN_MODES = ("softmax", "hard", "sinkhorn")

# The C++ struct of csrc/option_codes.h that spells each tuple.
CPP_NAMES = {
    "Direction": DIRECTIONS,
    "Align": ALIGNS,
    "Aggregate": AGGREGATES,
    "CorrelationMode": CORRELATION_MODES,
    "CorrelationPath": CORRELATION_PATHS,
    "SpatialKind": SPATIAL_KINDS,
    "SpatialSelect": SPATIAL_SELECTS,
    "AssignMode": ASSIGN_MODES,
}

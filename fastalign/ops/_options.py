"""The option names of the operators; an option's integer code (what the compiled and Triton
ops take) is its index in its tuple. csrc/option_codes.h spells the same codes for C++, and
tests/test_option_codes.py fails when the two differ.

Each code also has a name here, <OPTION>_<NAME>, for the launchers and the Triton kernels: a
kernel reads it as ``_options.ALIGN_MAX`` (Triton lets a kernel read attributes of an imported
module, while a bare global must be a tl.constexpr), so no kernel spells a code as a number.
"""

DIRECTIONS = ("t2i", "i2t", "both")
ALIGNS = ("max", "lse")
AGGREGATES = ("mean", "sum", "max", "lse")
CORRELATION_MODES = ("barlow", "softmax")
CORRELATION_PATHS = ("auto", "correlation", "gram")
SPATIAL_KINDS = ("inter", "intra")
SPATIAL_SELECTS = ("threshold", "soft", "topk")
ASSIGN_MODES = ("softmax", "hard", "sinkhorn")

DIRECTION_T2I = DIRECTIONS.index("t2i")
DIRECTION_I2T = DIRECTIONS.index("i2t")
DIRECTION_BOTH = DIRECTIONS.index("both")
ALIGN_MAX = ALIGNS.index("max")
ALIGN_LSE = ALIGNS.index("lse")
AGGREGATE_MEAN = AGGREGATES.index("mean")
AGGREGATE_SUM = AGGREGATES.index("sum")
AGGREGATE_MAX = AGGREGATES.index("max")
AGGREGATE_LSE = AGGREGATES.index("lse")
CORRELATION_MODE_BARLOW = CORRELATION_MODES.index("barlow")
CORRELATION_MODE_SOFTMAX = CORRELATION_MODES.index("softmax")
CORRELATION_PATH_AUTO = CORRELATION_PATHS.index("auto")
CORRELATION_PATH_CORRELATION = CORRELATION_PATHS.index("correlation")
CORRELATION_PATH_GRAM = CORRELATION_PATHS.index("gram")
SPATIAL_KIND_INTER = SPATIAL_KINDS.index("inter")
SPATIAL_KIND_INTRA = SPATIAL_KINDS.index("intra")
SPATIAL_SELECT_THRESHOLD = SPATIAL_SELECTS.index("threshold")
SPATIAL_SELECT_SOFT = SPATIAL_SELECTS.index("soft")
SPATIAL_SELECT_TOPK = SPATIAL_SELECTS.index("topk")
ASSIGN_MODE_SOFTMAX = ASSIGN_MODES.index("softmax")
ASSIGN_MODE_HARD = ASSIGN_MODES.index("hard")
ASSIGN_MODE_SINKHORN = ASSIGN_MODES.index("sinkhorn")

# The C++ struct of csrc/option_codes.h that spells each tuple, and the prefix of the tuple's
# named codes here.
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
CODE_PREFIXES = {
    "Direction": "DIRECTION",
    "Align": "ALIGN",
    "Aggregate": "AGGREGATE",
    "CorrelationMode": "CORRELATION_MODE",
    "CorrelationPath": "CORRELATION_PATH",
    "SpatialKind": "SPATIAL_KIND",
    "SpatialSelect": "SPATIAL_SELECT",
    "AssignMode": "ASSIGN_MODE",
}

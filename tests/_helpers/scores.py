"""The region-word scores the retrieval and search tests rank by."""

# Exact integer scores: t2i, max over regions, summed over words, on integer embeddings.
INTEGER_SCORE = dict(direction="t2i", align="max", aggregate="sum")
# The float score of the benchmarks (CHAN-style: max over regions, log-sum-exp over words).
FLOAT_SCORE = dict(direction="t2i", align="max", aggregate="lse")

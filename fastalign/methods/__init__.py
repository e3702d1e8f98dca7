"""Alignment methods built on the fused operators.

The baselines (VSE++ hinge, CHAN, LAPS) are configurations of the shared backbone
(``configs/``); the methods here add their own losses to it.
"""

from fastalign.methods.dias import DiasConfig, dias_loss, dias_regularizers, pooled_embeddings

__all__ = ["DiasConfig", "dias_loss", "dias_regularizers", "pooled_embeddings"]

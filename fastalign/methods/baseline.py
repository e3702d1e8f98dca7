"""The fine-grained baseline: the shared backbone and its matching loss alone.

CHAN (t2i / max / lse 0.1) and LAPS (both / max / mean on leaky-ReLU scores) are this
method with their similarity options in the ``model`` section (see ``chan_*.yaml`` and
``laps_*.yaml`` among the bundled configs).
"""

from fastalign.methods import register_method
from fastalign.methods.base import Method


@register_method
class Baseline(Method):
    """The matching loss on :func:`fastalign.region_word_similarity` of the backbone's
    region and word embeddings."""

    name = "baseline"

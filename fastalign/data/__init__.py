"""Data: vocabulary, precomputed-feature datasets, word vectors, synthetic data."""

from fastalign.data.fingerprint import data_fingerprint
from fastalign.data.precomp import (
    COCO_1K_FOLD_SIZE,
    COCO_1K_FOLDS,
    COCO_5K_SPLIT,
    CaptionSet,
    EpochSampler,
    PairBatch,
    PrecompDataset,
    collate_pairs,
    encode_captions,
    iter_captions,
    make_loader,
    open_image_features,
    read_captions,
)
from fastalign.data.synthetic import (
    FILLER_WORDS,
    GLOVE_FILE,
    PRESETS,
    ensure_synthetic,
    generate_synthetic,
    synthetic_folder,
)
from fastalign.data.vocab import (
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_ID,
    UNK_TOKEN,
    Vocabulary,
    tokenize,
)
from fastalign.data.word_vectors import load_word_vectors

__all__ = [
    "COCO_1K_FOLDS",
    "COCO_1K_FOLD_SIZE",
    "COCO_5K_SPLIT",
    "FILLER_WORDS",
    "GLOVE_FILE",
    "PAD_ID",
    "PRESETS",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "UNK_TOKEN",
    "CaptionSet",
    "EpochSampler",
    "PairBatch",
    "PrecompDataset",
    "Vocabulary",
    "collate_pairs",
    "data_fingerprint",
    "encode_captions",
    "ensure_synthetic",
    "generate_synthetic",
    "iter_captions",
    "load_word_vectors",
    "make_loader",
    "open_image_features",
    "read_captions",
    "synthetic_folder",
    "tokenize",
]

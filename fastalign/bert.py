"""BERT text encoder (optional): needs the ``transformers`` package and local weights.

Captions are tokenised by the model's own WordPiece tokenizer into ``[CLS] ... [SEP]``
ids; the encoder's last hidden states are projected to the embedding size and
L2-normalised, one embedding per word piece, as VSE infinity / CHAN's BERT variants do.
Nothing is ever downloaded: ``path`` is a folder written by ``save_pretrained`` (config,
weights, tokenizer files), loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastalign.data.vocab import PAD_ID
from fastalign.encoders import l2_normalize

TOKENIZER_KIND = "bert"


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "the BERT text encoder needs the 'transformers' package: pip install transformers"
        ) from error
    return transformers


def _checked_folder(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise ValueError(
            "model.bert_path must name a local BERT folder (save_pretrained output) when "
            "model.text_encoder is 'bert'"
        )
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.bert_path: no BERT model at {folder} (expected config.json, the weights "
            "and the tokenizer files written by save_pretrained)"
        )
    return folder


class BertCaptionTokenizer:
    """Captions -> WordPiece ids of a local BERT, the interface of :class:`Vocabulary`
    that the data pipeline uses (``encode``, ``len``, ``to_dict``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(_checked_folder(path))
        self._tokenizer = _transformers().AutoTokenizer.from_pretrained(
            self.path, local_files_only=True
        )
        if self._tokenizer.pad_token_id != PAD_ID:
            raise ValueError(
                f"model.bert_path: the tokenizer's padding id is "
                f"{self._tokenizer.pad_token_id}, fastalign pads with {PAD_ID}"
            )

    def encode(self, text: str) -> list[int]:
        """``[CLS]`` word pieces ``[SEP]``; an empty list when the text holds no token."""
        pieces = self._tokenizer.encode(text, add_special_tokens=False)
        if not pieces:
            return []
        return [self._tokenizer.cls_token_id, *pieces, self._tokenizer.sep_token_id]

    def __len__(self) -> int:
        return len(self._tokenizer)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": TOKENIZER_KIND, "path": self.path}


class BertTextEncoder(nn.Module):
    """(B, L) WordPiece ids with real lengths -> (B, L, D) L2-normalised token embeddings."""

    def __init__(self, path: str | os.PathLike, embed_dim: int) -> None:
        super().__init__()
        self.bert = _transformers().AutoModel.from_pretrained(
            str(_checked_folder(path)), local_files_only=True
        )
        self.fc = nn.Linear(self.bert.config.hidden_size, embed_dim)

    def forward(self, captions: Tensor, caption_lengths: Tensor) -> Tensor:
        positions = torch.arange(captions.shape[1], device=captions.device)
        attention_mask = (positions < caption_lengths.to(captions.device)[:, None]).long()
        hidden = self.bert(input_ids=captions, attention_mask=attention_mask).last_hidden_state
        return l2_normalize(self.fc(hidden))

"""The run's tokenizer, and the adapter megatron-core's datasets take in their config."""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import numpy as np

from data_tools.errors import DataError
from data_tools.tokenizers import Tokenizer, load_tokenizer
from nemotron_train.config.schema import Config


def build_tokenizer(cfg: Config) -> Tokenizer:
    """`data.tokenizer` as a tokenizer with `vocab_size`, `eod`, `encode`, `decode`.

    Its vocabulary must fit the model's embedding (`model.vocab_size`, which may be padded
    above the tokenizer's size but never below it)."""
    t = cfg.data.tokenizer
    tok = load_tokenizer(t.type, t.path, tiktoken_pattern=getattr(t, "tiktoken_pattern", None))
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer.type={t.type!r} has {tok.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size to at least {tok.vocab_size}"
        )
    return tok


class MegatronTokenizerAdapter:
    """What megatron-core's GPT datasets read from `config.tokenizer`: `vocab_size`, `eod`,
    and `unique_identifiers`, which enter the hash naming the cached sample indices (the
    tokenizer file's digest is part of it, so a changed vocabulary gets fresh indices).

    No `pad` attribute on purpose: mcore then pads short samples with a sentinel id it
    masks out, instead of masking a real token id found in the data."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.unique_identifiers = OrderedDict(
            [("class", type(tokenizer).__name__), ("fingerprint", tokenizer.fingerprint())]
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    @property
    def eod(self) -> int:
        return self._tok.eod

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text), dtype=np.int64)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

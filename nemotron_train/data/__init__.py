"""Training data: tokenizer, megatron-core GPT datasets and blends, micro-batch iterators.

The trainer's interface (stable):

    tokenizer = build_tokenizer(cfg)                      # vocab_size, eod, encode, decode
    train_ds, valid_ds, test_ds = build_datasets(cfg, tokenizer)
    it = make_train_iterator(train_ds, cfg, dp_rank, dp_size, consumed_samples)
    batch = next(it)  # tokens, labels, loss_mask, position_ids: [micro_batch_size, seq_length]
    ev = make_eval_iterator(valid_ds, cfg, dp_rank, dp_size)

`check_data_config(cfg)` validates the data section and every dataset file before a
launch; `check_indexed_dataset(prefix, vocab_size)` checks one `.bin/.idx` pair.
"""

import importlib
from typing import Any

from nemotron_train.errors import BadInputError, DataError, StaleCacheError

# Names re-exported from submodules, imported on first use: the `.bin/.idx` format and the
# tokenizers are read by light tools (preprocess, inspect) that should not load megatron-core.
_LAZY = {
    "build_datasets": "datasets", "cache_dir_for": "datasets", "check_data_config": "datasets",
    "split_sizes": "datasets", "check_indexed_dataset": "indexed", "DataLoaderState": "iterators",
    "make_eval_iterator": "iterators", "make_train_iterator": "iterators", "build_tokenizer": "tokenizers",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "BadInputError",
    "DataError",
    "DataLoaderState",
    "StaleCacheError",
    "build_datasets",
    "build_tokenizer",
    "cache_dir_for",
    "check_data_config",
    "check_indexed_dataset",
    "make_eval_iterator",
    "make_train_iterator",
    "split_sizes",
]

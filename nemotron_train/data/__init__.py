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

from nemotron_train.data.datasets import build_datasets, cache_dir_for, check_data_config, split_sizes
from nemotron_train.data.indexed import check_indexed_dataset
from nemotron_train.data.iterators import DataLoaderState, make_eval_iterator, make_train_iterator
from nemotron_train.data.tokenizers import build_tokenizer
from nemotron_train.errors import BadInputError, DataError, StaleCacheError

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

"""Train/valid/test datasets from `data.*` through megatron-core's
`BlendedMegatronDatasetBuilder` and `GPTDataset` (or `MockGPTDataset`).

Order of work, the same with or without torch.distributed:
1. every rank resolves the data sources (dataset prefixes, weights, split, sample counts);
2. rank 0 alone prepares the bundled corpus if used, validates every dataset
   (`check_indexed_dataset`, including token ids against `model.vocab_size`, and that
   each split gets documents) and refreshes the index cache (`cache.refresh_cache`);
   its error, if any, is raised on every rank, so no rank waits forever at a barrier;
3. every rank calls the builder, which builds the indices on rank 0 first and then
   loads them from the cache on the others.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from nemotron_train.config.schema import BlendEntry, Config, DataSource, choices
from nemotron_train.data.bundled import CORPUS_FILE, read_corpus
from nemotron_train.data.cache import refresh_cache
from nemotron_train.data.indexed import IndexedWriter, check_indexed_dataset, normalize_prefix, read_index, read_trusted_stats
from nemotron_train.data.tokenizers import MegatronTokenizerAdapter, Tokenizer, build_tokenizer, token_dtype_for
from nemotron_train.errors import DataError, UserError
from nemotron_train.rundir import data_cache_dir

SOURCES = choices(DataSource)
Blend = Tuple[List[str], Optional[List[float]]]


@dataclass
class DataSources:
    blend: Optional[Blend]  # one distribution, cut by `split`
    blend_per_split: Optional[List[Optional[Blend]]]  # or one blend per split
    split: Optional[str]
    sizes: List[int]  # samples per split: train, valid, test
    prefixes: List[str]  # every dataset, once
    cache_dir: str


def cache_dir_for(cfg: Config) -> str:
    """`data.cache_dir`, default `<run.output_dir>/data_cache` (nemotron_train.rundir)."""
    return data_cache_dir(cfg.run.output_dir, cfg.data.cache_dir)


def split_sizes(cfg: Config) -> List[int]:
    """Samples per split: train.steps x global batch for train; one global batch per eval
    iteration for every evaluation (each `eval_interval` steps and once at the end)."""
    t = cfg.train
    evals = (t.steps // t.eval_interval + 1) if t.eval_interval > 0 else 1
    return [t.steps * t.global_batch_size, evals * t.eval_iters * t.global_batch_size, t.eval_iters * t.global_batch_size]


def parse_split(text: str) -> List[float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"data.split={text!r}: expected up to three non-negative train,valid,test shares, e.g. \"99,1,0\"")
    values += [0.0] * (3 - len(values))
    if values[0] <= 0:
        raise DataError(f"data.split={text!r}: the train share must be positive")
    return [v / sum(values) for v in values]


def _blend(entries: Sequence[BlendEntry], key: str) -> Optional[Blend]:
    """Validated (prefixes, weights); zero weights drop an entry; None if empty."""
    if not entries:
        return None
    prefixes, weights = [], []
    for i, e in enumerate(entries):
        where = f"data.{key}[{i}]"
        if not e.path:
            raise DataError(f"{where}: empty path; give the prefix of a .bin/.idx pair")
        if not math.isfinite(e.weight) or e.weight < 0:
            raise DataError(f"{where} ({e.path}): weight {e.weight} must be a non-negative number")
        if e.weight > 0:
            prefixes.append(os.path.abspath(normalize_prefix(os.path.expanduser(e.path))))
            weights.append(float(e.weight))
    if not prefixes:
        raise DataError(f"data.{key}: every weight is zero; give at least one dataset a positive weight")
    if len(set(prefixes)) != len(prefixes):
        raise DataError(f"data.{key}: a dataset is listed twice; merge the entries and add their weights")
    # One dataset: mcore then builds a plain GPTDataset instead of a one-member blend.
    return (prefixes, weights if len(prefixes) > 1 else None)


def bundled_prefix(cfg: Config, tokenizer: Tokenizer) -> str:
    """Named by the tokenizer and the corpus file: a new version of either gets new files."""
    import hashlib

    h = hashlib.sha256(tokenizer.fingerprint().encode())
    if CORPUS_FILE.is_file():
        h.update(CORPUS_FILE.read_bytes())
    return os.path.join(cache_dir_for(cfg), "bundled", f"corpus_{h.hexdigest()[:12]}_text_document")


def prepare_bundled(cfg: Config, tokenizer: Tokenizer, log: Callable[[str], None] = print) -> str:
    """Tokenize the bundled corpus into the cache on first use; later calls reuse it."""
    prefix = bundled_prefix(cfg, tokenizer)
    stats = read_trusted_stats(prefix)
    if stats is not None and stats.get("extra", {}).get("tokenizer_fingerprint") == tokenizer.fingerprint():
        return prefix
    if not CORPUS_FILE.is_file():
        raise DataError(f"the bundled corpus is missing: {CORPUS_FILE} (reinstall the package)")
    docs = read_corpus(CORPUS_FILE)
    dtype = token_dtype_for(tokenizer.vocab_size)
    tokens, lengths = tokenizer.encode_to_array(docs, dtype, tokenizer.eod)
    writer = IndexedWriter(prefix, dtype)
    writer.add(tokens, lengths[lengths > 0])
    extra = {"tokenizer": tokenizer.spec, "tokenizer_fingerprint": tokenizer.fingerprint(), "inputs": [str(CORPUS_FILE)]}
    out = writer.finalize(extra)
    log(f"data: tokenized the bundled corpus ({out.documents:,} documents, {out.tokens:,} tokens) into {prefix}")
    return prefix


def resolve_sources(cfg: Config, tokenizer: Tokenizer) -> DataSources:
    """Where the data comes from; touches no dataset file (cheap, and safe on every rank)."""
    d, sizes, cache_dir = cfg.data, split_sizes(cfg), cache_dir_for(cfg)
    if d.source not in SOURCES:
        raise DataError(f"data.source={d.source!r}: expected one of {', '.join(SOURCES)}")
    if d.source == "mock":
        return DataSources(None, None, None, sizes, [], cache_dir)
    if d.source == "bundled":
        parse_split(d.split)
        return DataSources(([bundled_prefix(cfg, tokenizer)], None), None, d.split, sizes, [bundled_prefix(cfg, tokenizer)], cache_dir)
    per_split = [_blend(d.train_blend, "train_blend"), _blend(d.valid_blend, "valid_blend"), _blend(d.test_blend, "test_blend")]
    main = _blend(d.blend, "blend")
    if main is not None and any(per_split):
        raise DataError("data.blend and data.train_blend/valid_blend/test_blend are exclusive; use one or the other")
    if main is None and per_split[0] is None:
        raise DataError(
            "data.blend is empty: list {path, weight} entries of preprocessed .bin/.idx prefixes "
            "(or data.train_blend ...), or use data.source: bundled or mock"
        )
    if main is not None:
        parse_split(d.split)
        return DataSources(main, None, d.split, sizes, list(main[0]), cache_dir)
    prefixes = sorted({p for b in per_split if b for p in b[0]})
    return DataSources(None, per_split, None, sizes, prefixes, cache_dir)


def _check_splits_have_tokens(prefix: str, split: str, sizes: List[int]) -> None:
    """mcore loops forever on a split with no tokens; catch it with a clear message."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    matrix = convert_split_vector_to_split_matrix(parse_split(split))
    lengths = read_index(prefix).lengths
    n = lengths.size
    for name, bounds, size in zip(("train", "valid", "test"), matrix, sizes):
        if bounds is None or not size:
            continue
        beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
        if int(lengths[beg:end].sum()) == 0:
            raise DataError(
                f"{prefix}: the {name} split of data.split={split!r} gets no tokens ({n} sequences in the "
                "dataset); add documents or change data.split"
            )


def validate_datasets(cfg: Config, sources: DataSources, tokenizer: Tokenizer, log: Callable[[str], None] = print) -> None:
    # Token ranges of datasets without a preprocessing sidecar are scanned once, then
    # remembered in the cache directory (a multi-terabyte .bin is not rescanned per job).
    ranges = os.path.join(sources.cache_dir, "token_ranges.json")
    for prefix in sources.prefixes:
        stats = check_indexed_dataset(prefix, vocab_size=cfg.model.vocab_size, range_cache=ranges)
        made_with = stats.extra.get("tokenizer_fingerprint")
        if made_with and made_with != tokenizer.fingerprint():
            log(f"warning: {prefix} was tokenized with {stats.extra.get('tokenizer')}, not data.tokenizer ({tokenizer.spec})")
        if sources.split is not None:
            _check_splits_have_tokens(prefix, sources.split, sources.sizes)


def check_data_config(cfg: Config) -> None:
    """Preflight, before any rank starts: the tokenizer, the blend and every dataset file."""
    tokenizer = build_tokenizer(cfg)
    sources = resolve_sources(cfg, tokenizer)
    if cfg.data.source == "bundled":
        if not CORPUS_FILE.is_file():
            raise DataError(f"the bundled corpus is missing: {CORPUS_FILE} (reinstall the package)")
        return
    validate_datasets(cfg, sources, tokenizer)


# --------------------------------------------------------------------------- building


def on_rank0_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank raises rank 0's error, if any."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return fn()
    error: List[Optional[str]] = [None]
    result, original = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # shared with the other ranks, then re-raised here
            original = exc
            error[0] = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(error, src=0)
    if original is not None:
        raise original
    if error[0] is not None:
        raise DataError(f"data preparation failed on rank 0: {error[0]}")
    return result


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """megatron-core's blended-dataset code calls torch.distributed.get_rank() when it
    builds indices; a single-process tool gets a one-rank group for the duration."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gpt_config(cfg: Config, sources: DataSources, tokenizer: Tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    d = cfg.data
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=sources.blend,
        blend_per_split=sources.blend_per_split,
        split=sources.split,
        path_to_cache=None if cfg.data.source == "mock" else sources.cache_dir,
        mmap_bin_files=True,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        # The model builds its own causal mask; a [seq, seq] mask per sample would cost
        # 64 MiB at seq_length 8192.
        create_attention_mask=False,
    )


def prepare_data(cfg: Config, tokenizer: Tokenizer, sources: DataSources, rebuild: bool = True,
                 log: Callable[[str], None] = print) -> None:
    """Rank 0's share of the work: bundled corpus, dataset checks, cache freshness."""
    if cfg.data.source == "mock":
        return
    if cfg.data.source == "bundled":
        prepare_bundled(cfg, tokenizer, log)
    validate_datasets(cfg, sources, tokenizer, log)
    refresh_cache(sources.cache_dir, sources.prefixes, rebuild=rebuild, log=log)


def build_datasets(cfg: Config, tokenizer: Optional[Tokenizer] = None, rebuild_stale: bool = True,
                   built_on_this_rank: bool = True):
    """(train, valid, test) datasets; items are dicts of tensors `tokens`, `labels`,
    `loss_mask`, `position_ids` (plus `dataset_id` for blends). valid/test are None when
    `data.split` gives them no share, no blend names them, or `train.eval_iters` is 0.
    Every rank calls this (the builder synchronises ranks); with `built_on_this_rank=False`
    (tensor-parallel ranks other than 0, which receive batches by broadcast) all three are
    None and no dataset file is opened."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    tokenizer = tokenizer or build_tokenizer(cfg)
    sources = resolve_sources(cfg, tokenizer)
    on_rank0_first(lambda: prepare_data(cfg, tokenizer, sources, rebuild_stale))
    cls = MockGPTDataset if cfg.data.source == "mock" else GPTDataset
    builder = BlendedMegatronDatasetBuilder(
        cls, sources.sizes, lambda: built_on_this_rank, _gpt_config(cfg, sources, tokenizer)
    )
    with single_process_group():
        train, valid, test = builder.build()
    if cfg.train.eval_iters <= 0:
        valid = test = None
    return train, valid, test


def realised_shares(dataset: Any, samples: int) -> Tuple[List[str], np.ndarray]:
    """Dataset prefixes and how many of the first `samples` samples each one supplies."""
    if hasattr(dataset, "dataset_index"):
        members = [m.dataset_path for m in dataset.datasets]
        counts = np.bincount(np.asarray(dataset.dataset_index[:samples]), minlength=len(members))
        return members, counts
    return [getattr(dataset, "dataset_path", None) or "mock"], np.array([min(samples, len(dataset))])

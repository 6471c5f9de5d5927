"""Tokenize JSONL / JSONL.gz / Parquet into Megatron `.bin/.idx` datasets.

    python -m data_tools.preprocess --input 'data/*.jsonl.gz' --output-prefix out/web \\
        --tokenizer hf:tokenizer.json --append-eod --workers 8

writes `out/web_text_document.{bin,idx}` (one pair per `--json-keys` key) and a
`.stats.json` sidecar. Documents keep their input order whatever the worker count, so
`--workers 1` and `--workers 8` write identical files.

Why it is fast: the main process only reads raw blocks of lines and writes token bytes;
workers parse a whole block, tokenize it in one batch (byte-level BPE through a memo of
word-sized pieces, see `nemotron_train.data.tokenizers.PieceMemo`) and return one flat token
array per block instead of one Python list per document.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.inputs import DEFAULT_BLOCK_BYTES, WorkUnit, expand_inputs, iter_units, parse_unit, total_input_bytes
from nemotron_train.data.indexed import IndexedWriter, IndexStats
from nemotron_train.data.tokenizers import SPEC_HELP, Tokenizer, load_tokenizer, token_dtype_for
from nemotron_train.errors import DataError, UserError

_MAX_BAD_EXAMPLES = 5


@dataclass
class UnitResult:
    arrays: Dict[str, Tuple[np.ndarray, np.ndarray]]  # key -> (tokens, lengths), empty docs dropped
    records: int
    bad_count: int
    bad_examples: List[Tuple[str, int, str]]
    progress_bytes: int
    data_bytes: int


@dataclass
class PreprocessResult:
    files: List[str]
    outputs: Dict[str, IndexStats]
    records: int = 0
    documents: int = 0
    skipped: int = 0
    skipped_examples: List[Tuple[str, int, str]] = field(default_factory=list)
    seconds: float = 0.0
    data_bytes: int = 0

    @property
    def docs_per_s(self) -> float:
        return self.records / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.data_bytes / 1e6 / max(self.seconds, 1e-9)


def encode_documents(tokenizer: Tokenizer, docs: List[Any], dtype: Any, eod: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Documents (strings, or lists of sentence strings as Megatron allows) to a flat token
    array and per-document lengths."""
    if all(type(d) is str for d in docs):
        return tokenizer.encode_to_array(docs, dtype, eod)
    sentences = [s for d in docs for s in ([d] if isinstance(d, str) else d)]
    counts = np.array([1 if isinstance(d, str) else len(d) for d in docs], dtype=np.int64)
    flat, sentence_lengths = tokenizer.encode_to_array(sentences, dtype, None)
    padded = np.concatenate([sentence_lengths, [0]])  # reduceat needs an index for empty docs
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lengths = np.where(counts > 0, np.add.reduceat(padded, starts), 0)
    if eod is not None and lengths.size:
        flat = np.insert(flat, np.cumsum(lengths)[lengths > 0], eod)
        lengths = lengths + (lengths > 0)
    return flat, lengths


# --------------------------------------------------------------------------- workers

_STATE: Dict[str, Any] = {}


def _init_worker(tokenizer_spec: str, tiktoken_pattern: Optional[str], piece_memo: bool,
                 keys: Sequence[str], eod: bool, skip_bad: bool) -> None:
    tokenizer = load_tokenizer(tokenizer_spec, tiktoken_pattern=tiktoken_pattern, piece_memo=piece_memo)
    _set_state(tokenizer, keys, eod, skip_bad)


def _set_state(tokenizer: Tokenizer, keys: Sequence[str], eod: bool, skip_bad: bool) -> None:
    _STATE.update(
        tokenizer=tokenizer, keys=list(keys), eod=tokenizer.eod if eod else None,
        skip_bad=skip_bad, dtype=token_dtype_for(tokenizer.vocab_size),
    )


def _process(unit: WorkUnit) -> UnitResult:
    s = _STATE
    parsed = parse_unit(unit, s["keys"], s["skip_bad"])
    arrays = {}
    for key, docs in parsed.texts.items():
        tokens, lengths = encode_documents(s["tokenizer"], docs, s["dtype"], s["eod"])
        arrays[key] = (tokens, lengths[lengths > 0].astype(np.int32))
    data_bytes = len(unit.data) if unit.kind == "jsonl" else unit.progress_bytes
    return UnitResult(
        arrays, parsed.records, len(parsed.bad), parsed.bad[:_MAX_BAD_EXAMPLES], unit.progress_bytes, data_bytes,
    )


def _run_units(units: Iterable[WorkUnit], workers: int, init_args: Tuple[Any, ...], tokenizer: Tokenizer) -> Iterator[UnitResult]:
    """Results in input order. With several workers at most 2 units per worker are in
    flight, so memory stays bounded however large the input."""
    if workers <= 1:
        _set_state(tokenizer, *init_args[3:])
        yield from map(_process, units)
        return
    units = iter(units)
    if "fork" in multiprocessing.get_all_start_methods():
        # The parent tokenizes the first unit itself, then forks: every worker inherits the
        # tokenizer and a piece memo already holding the frequent words, instead of each
        # tokenizing them again (with 8 workers that halves the memo's misses).
        _set_state(tokenizer, *init_args[3:])
        first = next(units, None)
        if first is None:
            return
        yield _process(first)
        pool = multiprocessing.get_context("fork").Pool(workers)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)
    try:
        pending: deque = deque()
        for unit in units:
            pending.append(pool.apply_async(_process, (unit,)))
            while len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _progress_bar(total: int, enabled: Optional[bool]):
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: worker processes are forked while the bar lives
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="preprocess", file=sys.stderr,
                disable=disable, dynamic_ncols=True, smoothing=0.1)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: str = "byte",
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    progress: Optional[bool] = None,
    tiktoken_pattern: Optional[str] = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    piece_memo: bool = True,
    allow_empty: bool = False,
) -> PreprocessResult:
    """Tokenize `inputs` into `<output_prefix>_<key>_document.{bin,idx}` per key. An output
    without a token is refused (DataError, nothing written) unless `allow_empty`."""
    if workers < 1:
        raise DataError(f"--workers {workers}: need at least 1")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise DataError(f"--json-keys {' '.join(json_keys)}: give one or more distinct keys")
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, tiktoken_pattern=tiktoken_pattern, piece_memo=piece_memo)
    dtype = token_dtype_for(tok.vocab_size)
    extra = {"tokenizer": tok.spec, "tokenizer_fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
             "eod": tok.eod, "append_eod": append_eod, "inputs": [str(f) for f in files]}
    writers = {k: IndexedWriter(f"{output_prefix}_{k}_document", dtype) for k in json_keys}
    result = PreprocessResult(files=files, outputs={})
    init_args = (tok.spec, tiktoken_pattern, piece_memo, list(json_keys), append_eod, skip_bad_lines)
    start = time.perf_counter()
    try:
        results = _run_units(iter_units(files, json_keys, block_bytes), workers, init_args, tok)
        with _progress_bar(total_input_bytes(files), progress) as bar:
            for unit_result in results:
                _consume(unit_result, writers, result)
                bar.update(unit_result.progress_bytes)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{result.records:,} docs, {result.records / elapsed:,.0f} docs/s", refresh=False)
        empty = [k for k, w in writers.items() if w.tokens == 0]
        if empty and not allow_empty:
            raise DataError(
                f"--input {' '.join(map(str, inputs))}: no tokens for --json-keys {' '.join(empty)} "
                f"({result.records:,} documents read); check the input files and keys, or pass --allow-empty "
                "to write an empty dataset anyway"
            )
        result.outputs = {k: w.finalize(extra) for k, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    result.seconds = time.perf_counter() - start
    result.documents = min((s.documents for s in result.outputs.values()), default=0)
    return result


def _consume(unit_result: UnitResult, writers: Dict[str, IndexedWriter], result: PreprocessResult) -> None:
    for key, (tokens, lengths) in unit_result.arrays.items():
        writers[key].add(tokens, lengths)
    result.records += unit_result.records - unit_result.bad_count
    result.skipped += unit_result.bad_count
    result.data_bytes += unit_result.data_bytes
    room = _MAX_BAD_EXAMPLES - len(result.skipped_examples)
    result.skipped_examples.extend(unit_result.bad_examples[: max(room, 0)])


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="JSONL, JSONL.gz or Parquet files; globs are expanded (quote them)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer", default="byte", help=SPEC_HELP)
    p.add_argument("--tiktoken-pattern", default=None, help="tiktoken split pattern: v1, v2 (default), cl100k, gpt2 or a regex")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one output pair each (default: text)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's end-of-document token")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip unreadable records (counted and reported) instead of stopping")
    p.add_argument("--allow-empty", action="store_true",
                   help="write a dataset without tokens (with a warning) instead of refusing it")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")


def run(args: argparse.Namespace) -> int:
    result = preprocess(
        args.input, args.output_prefix, args.tokenizer, args.json_keys, args.append_eod, args.workers,
        args.skip_bad_lines, args.progress, args.tiktoken_pattern, allow_empty=args.allow_empty,
    )
    for key, stats in result.outputs.items():
        print(f"{stats.prefix}.bin/.idx: {stats.documents:,} documents, {stats.tokens:,} tokens ({stats.dtype}), key {key!r}")
        if stats.tokens == 0:
            print(f"warning: {stats.prefix}.bin holds no tokens (--allow-empty); training on it will fail",
                  file=sys.stderr)
    print(
        f"{len(result.files)} input file(s), {result.records:,} documents in {result.seconds:.1f}s: "
        f"{result.docs_per_s:,.0f} docs/s, {result.mb_per_s:,.1f} MB/s of input, {args.workers} worker(s)"
    )
    if result.skipped:
        examples = "; ".join(f"{path}:{line}: {reason}" for path, line, reason in result.skipped_examples)
        print(f"skipped {result.skipped:,} bad record(s) (first: {examples})", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.preprocess", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

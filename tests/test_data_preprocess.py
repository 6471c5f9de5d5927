"""Preprocessing: round trips through megatron-core's reader for every tokenizer kind,
input formats, worker-count invariance, and every bad-input error."""

from __future__ import annotations

import filecmp
import gzip
import json
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_tools.preprocess import main as preprocess_main
from data_tools.preprocess import preprocess
from nemotron_train.data.tokenizers import load_tokenizer
from nemotron_train.errors import BadInputError, DataError
from test_data_helpers import (make_hf_tokenizer, make_sentencepiece, make_tiktoken_ranks, sample_texts, write_jsonl,
                               write_parquet)


def _same_files(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + s, b + s, shallow=False) for s in (".bin", ".idx"))


def _roundtrip(tmp_path, spec: str, texts):
    src = write_jsonl(tmp_path / "in.jsonl", ({"text": t, "n": i} for i, t in enumerate(texts)))
    result = preprocess([str(src)], str(tmp_path / "out"), spec, append_eod=True, progress=False)
    tok = load_tokenizer(spec)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))  # megatron-core's own reader
    assert len(ds) == len(texts) == result.documents
    expected_dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    assert ds.index.dtype == expected_dtype
    for text, ids in zip(texts, (ds[i] for i in range(len(ds)))):
        assert int(ids[-1]) == tok.eod
        assert tok.decode(ids[:-1].tolist()) == text
        assert ids[:-1].tolist() == tok.encode(text)


def test_byte_roundtrip_through_mcore_reader(tmp_path):
    _roundtrip(tmp_path, "byte", sample_texts(40))


def test_hf_roundtrip(tmp_path):
    path = make_hf_tokenizer(tmp_path)
    _roundtrip(tmp_path, f"hf:{path}", sample_texts(40, seed=5))


def test_tiktoken_roundtrip(tmp_path):
    path = make_tiktoken_ranks(tmp_path)
    tok = load_tokenizer(f"tiktoken:{path}")
    assert tok.vocab_size == 256 + 13 + 1 and tok.eod == 269  # <|endoftext|> appended after the ranks
    assert tok.encode("the") == [258]
    _roundtrip(tmp_path, f"tiktoken:{path}", sample_texts(40, seed=6))


def test_sentencepiece_roundtrip(tmp_path):
    path = make_sentencepiece(tmp_path)
    _roundtrip(tmp_path, f"sentencepiece:{path}", sample_texts(40, seed=7))


def test_megatron_json_tiktoken_layout(tmp_path):
    """Megatron's JSON vocab: 1000 special tokens first, `</s>` (id 2) ends documents."""
    import base64

    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": chr(i)} for i in range(256)]
    vocab.append({"rank": 256, "token_bytes": base64.b64encode(b"ab").decode(), "token_str": "ab"})
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab))
    tok = load_tokenizer(f"tiktoken:{path}")
    assert tok.eod == 2 and tok.vocab_size == 1257
    assert tok.encode("ab") == [1256] and tok.encode("a") == [1000 + 97]
    assert tok.decode(tok.encode("xab y")) == "xab y"


@pytest.mark.parametrize("kind", ["hf", "tiktoken"])
def test_piece_memo_matches_direct_tokenization(tmp_path, kind):
    """The memo must never change ids: compare on adversarial whitespace and unicode."""
    path = make_hf_tokenizer(tmp_path) if kind == "hf" else make_tiktoken_ranks(tmp_path)
    tok = load_tokenizer(f"{kind}:{path}")
    assert tok._memo is not None
    rng = random.Random(0)
    alphabet = [" ", " ", "  ", "\n", "\t", "\r\n", "the", "é", ",", "7", "\u00a0", "\u3000", "\x1c", "'s", "😀", "ing"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(3000)]
    flat, lengths = tok.encode_to_array(texts, np.int64, tok.eod)
    want = [ids + [tok.eod] if ids else [] for ids in map(tok.encode, texts)]
    assert lengths.tolist() == [len(w) for w in want]
    assert flat.tolist() == [i for w in want for i in w]


def test_mcore_builder_files_readable_by_our_reader(tmp_path):
    """Files written by megatron-core's IndexedDatasetBuilder, including documents made of
    several sequences, pass our checks and read back identically."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from nemotron_train.data.indexed import IndexedReader, check_indexed_dataset

    prefix = str(tmp_path / "mcore")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(1000))
    docs = [[[1, 2, 3], [4, 5]], [[6]], [[7, 8, 9, 10]]]
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    stats = check_indexed_dataset(prefix, vocab_size=11)
    assert (stats.documents, stats.sequences, stats.tokens, stats.max_token_id) == (3, 4, 10, 10)
    reader = IndexedReader(prefix)
    assert [reader.document(i).tolist() for i in range(3)] == [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10]]
    assert reader.sequence(1).tolist() == [4, 5]
    assert reader.document_lengths().tolist() == [5, 1, 4]


def test_gz_parquet_and_glob_match_plain_jsonl(tmp_path):
    texts = sample_texts(60, seed=3)
    records = [{"text": t} for t in texts]
    write_jsonl(tmp_path / "plain.jsonl", records)
    preprocess([str(tmp_path / "plain.jsonl")], str(tmp_path / "plain"), progress=False)
    write_jsonl(tmp_path / "gz" / "a.jsonl.gz", records[:25], gz=True)
    write_jsonl(tmp_path / "gz" / "b.jsonl.gz", records[25:], gz=True)
    preprocess([str(tmp_path / "gz" / "*.jsonl.gz")], str(tmp_path / "globbed"), progress=False)
    assert _same_files(str(tmp_path / "plain_text_document"), str(tmp_path / "globbed_text_document"))
    write_parquet(tmp_path / "p.parquet", records, row_group_size=7)
    preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "pq"), progress=False)
    assert _same_files(str(tmp_path / "plain_text_document"), str(tmp_path / "pq_text_document"))
    preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "pq2"), workers=2, progress=False)
    assert _same_files(str(tmp_path / "plain_text_document"), str(tmp_path / "pq2_text_document"))


def test_multiple_json_keys_write_one_pair_each(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc", "title": "T1"}, {"text": "de", "title": "T2"}])
    result = preprocess([str(src)], str(tmp_path / "o"), json_keys=["text", "title"], progress=False)
    assert result.outputs["text"].tokens == 5 and result.outputs["title"].tokens == 4
    titles = IndexedDataset(str(tmp_path / "o_title_document"))  # keep it alive: items view its mmap
    assert titles[1].tolist() == list(b"T2")


@pytest.mark.parametrize("spec_kind", ["byte", "hf"])
def test_two_workers_write_identical_files(tmp_path, spec_kind):
    spec = "byte" if spec_kind == "byte" else f"hf:{make_hf_tokenizer(tmp_path)}"
    src = write_jsonl(tmp_path / "in.jsonl", ({"text": t} for t in sample_texts(400, seed=9)))
    one = preprocess([str(src)], str(tmp_path / "w1"), spec, append_eod=True, workers=1, progress=False, block_bytes=4096)
    two = preprocess([str(src)], str(tmp_path / "w2"), spec, append_eod=True, workers=2, progress=False, block_bytes=4096)
    assert one.documents == two.documents == 400
    assert _same_files(str(tmp_path / "w1_text_document"), str(tmp_path / "w2_text_document"))


def test_bad_json_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n{"text": "last"}\n')
    with pytest.raises(BadInputError, match=r"bad\.jsonl:3: invalid JSON.*--skip-bad-lines"):
        preprocess([str(src)], str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o_text_document.bin").exists()  # nothing half-written is left
    with pytest.raises(BadInputError, match=r"bad\.jsonl:3"):  # same line with workers and small blocks
        preprocess([str(src)], str(tmp_path / "o"), workers=2, block_bytes=8, progress=False)


def test_skip_bad_lines_counts_and_reports(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\nnot json\n{"other": 1}\n{"text": 5}\n[1, 2]\n\n{"text": "end"}\n')
    rc = preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--skip-bad-lines"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 4 bad record(s)" in err and "bad.jsonl:2: invalid JSON" in err
    assert "bad.jsonl:3: no key 'text'" in err
    assert [d.tolist() for d in IndexedDataset(str(tmp_path / "o_text_document"))] == [list(b"ok"), list(b"end")]


@pytest.mark.parametrize(
    "line, message",
    [('{"other": "x"}', "no key 'text'"), ('{"text": 12}', "holds int"), ('{"text": null}', "is null"),
     ('"just a string"', "expected a JSON object")],
)
def test_bad_record_kinds(tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(BadInputError, match=rf"in\.jsonl:2: .*{message}"):
        preprocess([str(src)], str(tmp_path / "o"), progress=False)


def test_input_and_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match="matches no files"):
        preprocess([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), progress=False)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="unknown tokenizer 'gpt9'"):
        preprocess([str(src)], str(tmp_path / "o"), "gpt9", progress=False)
    with pytest.raises(DataError, match="tokenizer file not found"):
        preprocess([str(src)], str(tmp_path / "o"), f"hf:{tmp_path / 'nope.json'}", progress=False)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(DataError, match="not a Hugging Face tokenizers JSON"):
        load_tokenizer(f"hf:{tmp_path / 'junk.json'}")
    write_parquet(tmp_path / "p.parquet", [{"body": "x"}])
    with pytest.raises(DataError, match=r"no column text \(columns: body\)"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "o"), progress=False)
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-30])
    with pytest.raises(DataError, match="trunc.jsonl.gz: cannot read"):
        preprocess([str(tmp_path / "trunc.jsonl.gz")], str(tmp_path / "o"), progress=False)


def test_parquet_null_row_is_reported_by_row(tmp_path):
    write_parquet(tmp_path / "p.parquet", [{"text": "a"}, {"text": None}, {"text": "c"}], row_group_size=2)
    with pytest.raises(BadInputError, match=r"p\.parquet: row 2: key 'text' is null"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "o"), progress=False)


def test_megatron_sentence_lists_and_empty_documents(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": ["ab", "c"]}, {"text": ""}, {"text": []}, {"text": "d"}])
    result = preprocess([str(src)], str(tmp_path / "o"), append_eod=True, progress=False)
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [d.tolist() for d in ds] == [[97, 98, 99, 256], [100, 256]]  # empty documents are dropped
    assert result.records == 4


def test_nemotron_train_preprocess_command(tmp_path, capsys):
    from nemotron_train.cli import main

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--append-eod"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_tiktoken_pattern_option(tmp_path):
    path = make_tiktoken_ranks(tmp_path)
    named = load_tokenizer(f"tiktoken:{path}", tiktoken_pattern="cl100k")
    custom = load_tokenizer(f"tiktoken:{path}", tiktoken_pattern=r"\S+|\s+")
    assert named._memo is not None and custom._memo is None  # the memo only trusts known patterns
    assert named.encode(" the") == [260] and custom.encode(" the") == [32, 258]  # " the" is one pre-token only in cl100k
    texts = sample_texts(30, seed=8)
    src = write_jsonl(tmp_path / "in.jsonl", ({"text": t} for t in texts))
    rc = preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer", f"tiktoken:{path}",
                          "--tiktoken-pattern", r"\S+|\s+", "--no-progress"])
    assert rc == 0
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [custom.decode(ds[i].tolist()) for i in range(len(ds))] == texts
    assert ds[0].tolist() == custom.encode(texts[0])

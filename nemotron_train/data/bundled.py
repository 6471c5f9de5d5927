"""The bundled corpus and its BPE, shipped with the package in `nemotron_train/data/corpus/`.

`corpus.txt.gz` is synthetic English (documents separated by blank lines) and
`tokenizer.json` a 512-token byte-level BPE trained on it; both are CC0 (corpus/README.md).
`data.source: bundled` tokenizes the corpus into the run's cache on first use
(`nemotron_train.data.datasets.prepare_bundled`); `data.tokenizer.type: bundled` loads the BPE.
The `make_corpus` data tool regenerates both files (docs/data.md, "The bundled corpus").
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import List

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILE = CORPUS_DIR / "corpus.txt.gz"
TOKENIZER_FILE = CORPUS_DIR / "tokenizer.json"


def read_corpus(path: Path = CORPUS_FILE) -> List[str]:
    """The bundled corpus as documents (blank-line separated in the file)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [d.strip() for d in f.read().split("\n\n") if d.strip()]

"""Replace one `## ` section of docs/benchmarks.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def update_section(title: str, body: str, doc: Path = DOC) -> None:
    """`title` is the full heading line (`## Name`); `body` the section text after it."""
    replace_section(f"{title}\n\n{body.strip()}\n", doc)


def replace_section(section: str, doc: Path = DOC) -> None:
    """`section` starts with its `## ` heading line; an existing one of that title is replaced."""
    title = section.splitlines()[0].strip()
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    section = section.rstrip("\n") + "\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")

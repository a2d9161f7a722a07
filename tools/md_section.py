"""Benchmark tables in the docs: a markdown table and the marked section of a doc that holds it."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def replace_section(path: Path, name: str, body: str, title: str) -> None:
    """Put `body` between `<!-- name:start -->` and `<!-- name:end -->` in `path` (markers appended,
    or a new doc titled `title` written, when missing); the rest of the doc is kept."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else f"# {title}\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    pre, rest = text.split(start, 1)
    path.write_text(f"{pre}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")

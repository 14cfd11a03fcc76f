"""Texts shipped with ltengine for demos, haystacks and perplexity.

pride-and-prejudice.txt: Jane Austen, *Pride and Prejudice* (1813), Project Gutenberg eBook #1342,
public domain in the United States; the Project Gutenberg header is kept in the file.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

BOOK = Path(__file__).with_name("pride-and-prejudice.txt")


@lru_cache(maxsize=1)
def book_text() -> str:
    """The novel's text from Chapter I on, without the Project Gutenberg header (the shipped copy
    ends inside the last chapters)."""
    raw = BOOK.read_text(encoding="utf-8")
    start = raw.index("Chapter I.]")
    return "CHAPTER I." + raw[start + len("Chapter I.]"):].rstrip()


def _roman(s: str) -> int:
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
    total = 0
    for a, b in zip(s, s[1:] + " "):
        total += -values[a] if values.get(b, 0) > values[a] else values[a]
    return total


@lru_cache(maxsize=1)
def _chapters() -> dict[int, str]:
    parts = re.split(r"\n(?=\s*chapter [ivxlc]+\.)", book_text(), flags=re.IGNORECASE)
    out = {}
    for part in parts:
        m = re.match(r"\s*chapter ([ivxlc]+)\.", part, flags=re.IGNORECASE)
        if m:
            out[_roman(m.group(1).upper())] = part.strip()
    return out


def chapter(n: int) -> str:
    """Chapter ``n`` of the novel (1-based), heading included."""
    chapters = _chapters()
    if n not in chapters:
        raise ValueError(f"chapter must be one of 1..{max(chapters)}, got {n}")
    return chapters[n]

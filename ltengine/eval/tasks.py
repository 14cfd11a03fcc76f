"""Synthetic long-context tasks over the shipped novel: passkey, needle-in-a-haystack, perplexity text.

A task prompt is built at the token level so its length is exact: chat-template head, haystack tokens
with the needle's tokens inserted at a sentence boundary near the requested depth, the question, the
template's assistant header, and an answer prefix (so the answer's digits come within a few decoded
tokens). ``Sample.needle`` is the needle's token span, for the attention studies.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from ..data import book_text

SPLIT = "\x00HAYSTACK\x00"  # placeholder the chat template carries through unchanged
WORDS = ("apple", "river", "violin", "lantern", "meadow", "harbor", "falcon", "copper", "orchid", "glacier",
         "saddle", "pepper", "marble", "thunder", "compass", "velvet", "canyon", "walnut", "beacon", "ember")


@dataclass
class Sample:
    ids: list[int]
    answer: str  # the key the output must contain
    depth: float  # needle position / haystack length, in [0, 1]
    needle: tuple[int, int]  # token span [start, end) of the needle in ids
    length: int  # the requested prompt length


def novel_text() -> str:
    """The novel with hard-wrapped lines joined (paragraph breaks kept)."""
    return re.sub(r"(?<!\n)\n(?!\n)", " ", book_text())


@lru_cache(maxsize=4)
def novel_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole novel, and the indices just after sentence ends (needle slots)."""
    ids = tokenizer(novel_text(), add_special_tokens=False)["input_ids"]
    ends = [i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))]
    return ids, ends


def _chat_parts(tokenizer, instruction: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack for a one-turn chat prompt."""
    content = f"{instruction}\n\n{SPLIT}\n\n{question}"
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # tiny test tokenizers: plain text
        text = content + "\n"
    head, tail = text.split(SPLIT)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(head), enc(tail + answer_prefix)


def _haystack_prompt(tokenizer, length: int, depth: float, needle: str, question: str, answer_prefix: str,
                     rng: random.Random, instruction: str) -> tuple[list[int], tuple[int, int], float]:
    head, tail = _chat_parts(tokenizer, instruction, question, answer_prefix)
    needle_ids = tokenizer(" " + needle, add_special_tokens=False)["input_ids"]
    n_hay = length - len(head) - len(tail) - len(needle_ids)
    book, ends = novel_ids(tokenizer)
    if n_hay < 1 or n_hay > len(book) // 2:
        raise ValueError(f"prompt length {length} must leave 1..{len(book) // 2} haystack tokens "
                         f"(the template and needle take {length - n_hay})")
    start = rng.choice([e for e in ends if e + n_hay <= len(book)])
    hay = book[start:start + n_hay]
    slots = [e - start for e in ends if start <= e <= start + n_hay] + [0, n_hay]
    at = min(slots, key=lambda s: abs(s - depth * n_hay))
    ids = head + hay[:at] + needle_ids + hay[at:] + tail
    return ids, (len(head) + at, len(head) + at + len(needle_ids)), at / n_hay


def passkey_sample(tokenizer, length: int, rng: random.Random, depth: float | None = None) -> Sample:
    """Novel haystack with "The pass key is NNNNN. Remember it." at a random (or given) depth."""
    key = str(rng.randint(10000, 99999))
    depth = rng.random() if depth is None else depth
    ids, span, real = _haystack_prompt(
        tokenizer, length, depth, f"The pass key is {key}. Remember it. {key} is the pass key.",
        "What is the pass key?", "The pass key is", rng,
        "There is a pass key hidden in the following text. Find it and remember it.")
    return Sample(ids, key, real, span, length)


def niah_sample(tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    """Needle-in-a-haystack (RULER-style single needle): a 7-digit magic number for a named word."""
    word, key = rng.choice(WORDS), str(rng.randint(1000000, 9999999))
    ids, span, real = _haystack_prompt(
        tokenizer, length, depth, f"One of the special magic numbers for {word} is: {key}.",
        f"What is the special magic number for {word} mentioned in the provided text?",
        f"The special magic number for {word} mentioned in the provided text is", rng,
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.")
    return Sample(ids, key, real, span, length)


def ppl_segments(tokenizer, context: int, scored: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` disjoint windows of ``context + scored`` novel tokens, at seeded offsets."""
    book, _ = novel_ids(tokenizer)
    size = context + scored
    if n * size > len(book):
        raise ValueError(f"{n} segments of {size} tokens need {n * size} tokens; the novel has {len(book)}")
    slots = random.Random(seed).sample(range(len(book) // size), n)
    return [book[s * size:(s + 1) * size] for s in sorted(slots)]

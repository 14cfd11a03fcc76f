"""What every RULER task shares: the sample, the token budget and the fitting of a haystack into it,
the haystack sources (the shipped novel's sentences and words), keys and values, and RULER's scoring."""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from .tasks import SPLIT, novel_text

# tokens to generate per task (RULER: niah 128, vt 30, cwe 120, fwe 50; ours fit the answers' length)
MAX_NEW = {"niah_single_3": 40, "niah_multikey_3": 40, "niah_multivalue": 48, "niah_multiquery": 48,
           "vt": 30, "cwe": 48, "fwe": 24}
@dataclass
class RulerSample:
    task: str
    length: int  # the requested length (prompt + generated tokens)
    index: int
    instruction: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    ids: list[int] = field(default_factory=list)  # the chat prompt, token ids
    max_new_tokens: int = 16
    question_tokens: int = 0  # the last tokens of ``ids``: the question, the template's end, the answer prefix

    @property
    def document(self) -> str:
        """The instruction and the context as text."""
        return f"{self.instruction}\n\n{self.context}"

    @property
    def document_ids(self) -> list[int]:
        """What a document session prefills: ``ids`` up to the question (template head, instruction,
        context), so that a session answers on exactly the harness configs' prompt."""
        return self.ids[:len(self.ids) - self.question_tokens]

    @property
    def question_ids(self) -> list[int]:
        return self.ids[len(self.ids) - self.question_tokens:]


def max_new_tokens(task: str) -> int:
    return MAX_NEW.get(task, 16)


def tolerance(length: int) -> int:
    """How much shorter than its target a prompt may be (haystack units are whole sentences / items)."""
    return max(96, length // 32)


@lru_cache(maxsize=1)
def novel_sentences() -> tuple[str, ...]:
    text = re.sub(r"\s+", " ", novel_text())
    return tuple(s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'_])", text) if len(s.strip()) > 1)


@lru_cache(maxsize=1)
def novel_words() -> tuple[str, ...]:
    """Distinct lower-case words of 4-10 letters from the novel, in first-seen order."""
    seen = dict.fromkeys(w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", novel_text()))
    return tuple(seen)


def _key(kind: str, rng: random.Random) -> str:
    if kind == "words":
        words = novel_words()
        return f"{rng.choice(words)}-{rng.choice(words)}"
    if kind == "numbers":
        return str(rng.randint(1000000, 9999999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(kind: str, n: int, rng: random.Random, taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out = []
    while len(out) < n:
        k = _key(kind, rng)
        if k not in taken:
            taken.add(k)
            out.append(k)
    return out


class _Builder:
    """Fits a list of haystack units around fixed items into a token budget."""

    def __init__(self, tokenizer, task: str, length: int, instruction: str, question: str, answer_prefix: str):
        self.tok, self.task, self.length = tokenizer, task, length
        self.instruction, self.question, self.answer_prefix = instruction, question, answer_prefix
        content = f"{instruction}\n\n{SPLIT}\n\n{question}"
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        else:  # tiny test tokenizers: plain text
            text = content + "\n"
        head, tail = text.split(SPLIT)
        self.head, self.tail = self.enc(head), self.enc(tail + answer_prefix)
        self.max_new = max_new_tokens(task)
        self.budget = length - self.max_new - len(self.head) - len(self.tail)  # context tokens allowed
        if self.budget < 64:
            raise ValueError(f"{task}: length {length} leaves {self.budget} context tokens after the template "
                             f"and {self.max_new} generated tokens; use a length of at least "
                             f"{length - self.budget + 64}")

    def enc(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def fit(self, make, n0: int) -> tuple[str, list[int]]:
        """``make(n)`` -> context text with ``n`` haystack units: a unit count whose context is within
        the budget and at most half the tolerance below it (secant steps, then bisection)."""
        cache: dict[int, int] = {}

        def size(n: int) -> int:
            if n not in cache:
                cache[n] = len(self.enc(make(n)))
            return cache[n]

        slack = tolerance(self.length) // 2
        good = lambda n: self.budget - slack <= size(n) <= self.budget  # noqa: E731
        lo, hi, n = 0, None, max(1, n0)
        for _ in range(8):  # tokens are nearly proportional to units: a few secant steps land inside
            if good(n):
                lo = hi = n
                break
            if size(n) <= self.budget:
                lo = max(lo, n)
            else:
                hi = n if hi is None else min(hi, n)
            target = self.budget - slack / 2
            n = max(1, round(n * target / max(1, size(n))))
            if n in (lo, hi) or (hi is not None and not lo < n < hi):
                break
        if hi is None:
            while size(lo) <= self.budget:  # grow until over budget (the rare short first guess)
                if size(2 * lo + 1) == size(lo):
                    raise ValueError(f"{self.task}: the haystack ran out at {size(lo)} of {self.budget} tokens")
                lo, hi = (2 * lo + 1, None) if size(2 * lo + 1) <= self.budget else (lo, 2 * lo + 1)
                if hi is not None:
                    break
        while hi - lo > 1 and not good(lo):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if size(mid) <= self.budget else (lo, mid)
        text = make(lo)
        ids = self.enc(text)
        if not self.budget - tolerance(self.length) <= len(ids) <= self.budget:
            raise ValueError(f"{self.task}: could not fit the context into {self.budget} tokens "
                             f"(got {len(ids)}; tolerance {tolerance(self.length)})")
        return text, ids

    def sample(self, index: int, text: str, ids: list[int], answers: list[str]) -> RulerSample:
        return RulerSample(self.task, self.length, index, self.instruction, text, self.question,
                           self.answer_prefix, answers, self.head + ids + self.tail, self.max_new, len(self.tail))


def _unit_tokens(b: _Builder, units: list[str]) -> float:
    return max(1.0, len(b.enc(" ".join(units[:50]))) / min(50, len(units)))


def string_match_all(pred: str, answers: list[str]) -> float:
    """RULER's metric for the synthetic tasks: the fraction of the answers found in the output (case-insensitive)."""
    p = pred.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def string_match_part(pred: str, answers: list[str]) -> float:
    """RULER's QA metric: 1 if any answer is found in the output."""
    p = pred.lower()
    return float(any(a.lower() in p for a in answers))


def record(s: RulerSample, config: str, text: str, layers, extra: dict) -> dict:
    """One scored output: the sample, the config's name, the text, its lazy layers and both RULER scores."""
    return dict(task=s.task, length=s.length, sample=s.index, config=config, prompt_tokens=len(s.ids),
                answers=s.answers, output=text, lazy_layers=list(layers), all=string_match_all(text, s.answers),
                part=string_match_part(text, s.answers), **extra)

"""RULER's synthetic task families, generated offline by our own code (Hsieh et al., "RULER: What's the
Real Context Size of Your Long-Context Language Models?", 2024; templates follow NVIDIA/RULER's
``scripts/data/synthetic``, the generators are ours).

Each sample is (context, question, answers) plus the instruction and an answer prefix, so a document
session can prefill ``instruction + context`` and ask ``question``; ``ids`` is the one-turn chat prompt
``head + context + tail`` built at the token level, no longer than ``length - max_new_tokens`` (as
RULER counts the generated tokens inside the length) and at most ``tolerance(length)`` shorter.

Haystacks: "noise" (RULER's repeated "The grass is green. ..."), "essay" (consecutive sentences of the
shipped novel, where RULER uses Paul Graham's essays) and "needle" (distractor needles). Keys: word
pairs ("adj-noun" in RULER; two novel words here), 7-digit numbers or UUIDs; values: 7-digit numbers
or UUIDs. Differences from RULER: no few-shot example in cwe; cwe's common-word frequency scales with
the length (10 words at 30 repeats do not fit in 1k tokens); fwe counts are the zeta(2) expectation,
not a draw, so the top three are never tied.
"""
from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from .tasks import SPLIT, novel_text

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INSTRUCTION = ("Some special magic {t} are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the {t} afterwards.")
NIAH_NEEDLE = "One of the special magic {t} for {key} is: {value}."

# task -> (haystack, key kind, value kind, keys inserted, values per key, keys queried)
NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
# tokens to generate per task (RULER: niah 128, vt 30, cwe 120, fwe 50; ours fit the answers' length)
MAX_NEW = {"niah_single_3": 40, "niah_multikey_3": 40, "niah_multivalue": 48, "niah_multiquery": 48,
           "vt": 30, "cwe": 72, "fwe": 24}
TASKS = tuple(NIAH) + ("vt", "cwe", "fwe")


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

    @property
    def document(self) -> str:
        """What a document session prefills: the instruction and the context."""
        return f"{self.instruction}\n\n{self.context}"


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
                           self.answer_prefix, answers, self.head + ids + self.tail, self.max_new)


def _unit_tokens(b: _Builder, units: list[str]) -> float:
    return max(1.0, len(b.enc(" ".join(units[:50]))) / min(50, len(units)))


def _insert(units: list[str], items: list[str], rng: random.Random) -> list[str]:
    """``items`` at random unit boundaries (in order; several may share one)."""
    slots = sorted(rng.randint(0, len(units)) for _ in items)
    out, prev = [], 0
    for s, item in zip(slots, items):
        out += units[prev:s] + [item]
        prev = s
    return out + units[prev:]


def niah_sample(tokenizer, task: str, length: int, rng: random.Random, index: int = 0) -> RulerSample:
    hay, kkind, vkind, n_keys, n_values, n_query = NIAH[task]
    t = {"numbers": "numbers", "uuids": "uuids"}[vkind]
    keys = _distinct(kkind, n_keys, rng)
    values = [_distinct(vkind, n_values, rng) for _ in keys]
    needles = [NIAH_NEEDLE.format(t=t, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    queried = list(range(n_keys)) if n_query > 1 else [rng.randrange(n_keys)]
    qkeys = [keys[i] for i in queried]
    query = qkeys[0] if len(qkeys) == 1 else ", ".join(qkeys[:-1]) + f", and {qkeys[-1]}"
    answers = [v for i in queried for v in values[i]]
    b = _Builder(tokenizer, task, length, NIAH_INSTRUCTION.format(t=t),
                 f"What are all the special magic {t} for {query} mentioned in the provided text?",
                 f" The special magic {t} for {query} mentioned in the provided text are", )
    if hay == "noise":
        units, sep = [NOISE] * (b.budget // 10 + 8), " "
    elif hay == "essay":  # words, so the cut is exact; needles go after the sentence end before their depth
        words = " ".join(novel_sentences()).split(" ")
        need = b.budget + 64
        start = rng.randrange(len(words) - need)
        units, sep = words[start:start + need], " "
    else:  # distractor needles with other keys
        distract = _distinct(kkind, b.budget // 8 + 8, rng, set(keys))
        units = [NIAH_NEEDLE.format(t=t, key=k, value=_key(vkind, rng)) for k in distract]
        sep = "\n"
    slots = sorted(rng.random() for _ in needles)  # needle depths, fixed as the unit count changes

    def make(n: int) -> str:
        body = list(units[:n])
        for depth, needle in sorted(zip(slots, needles), reverse=True):
            at = round(depth * n)
            if hay == "essay":
                at = next((i + 1 for i in range(at - 1, -1, -1) if body[i].endswith((".", "!", "?"))), 0)
            body.insert(at, needle)
        return sep.join(body)

    text, ids = b.fit(make, int(b.budget / _unit_tokens(b, units)) - len(needles) * 8)
    return b.sample(index, text, ids, answers)


def vt_sample(tokenizer, length: int, rng: random.Random, index: int = 0, hops: int = 4, chains: int = 1) -> RulerSample:
    """Variable tracking: ``VAR A = 12345``, then ``VAR B = VAR A`` ... hidden in noise; which variables
    hold the value?"""
    names = _distinct_names(rng, chains * (hops + 1))
    values = [str(rng.randint(10000, 99999)) for _ in range(chains)]
    stmts, answers = [], None
    for c in range(chains):
        vs = names[c * (hops + 1):(c + 1) * (hops + 1)]
        stmts.append([f"VAR {vs[0]} = {values[c]}."] + [f"VAR {vs[j]} = VAR {vs[j - 1]}." for j in range(1, len(vs))])
        if c == 0:
            answers = vs
    value = values[0]
    b = _Builder(tokenizer, "vt", length,
                 "Memorize and track the chain(s) of variable assignment hidden in the following text.",
                 f"Question: Find all variables that are assigned the value {value} in the text above.",
                 f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                 f"variables are assigned the value {value}, they are: ")
    ordered = [s for chain in stmts for s in chain]  # chains one after another; order within a chain kept
    slots = sorted(rng.random() for _ in ordered)

    def make(n: int) -> str:
        body = [NOISE] * n
        for depth, s in sorted(zip(slots, ordered), reverse=True):
            body.insert(round(depth * n), s)
        return " ".join(body)

    text, ids = b.fit(make, b.budget // 24)
    return b.sample(index, text, ids, answers)


def _distinct_names(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if s not in out:
            out.append(s)
    return out


def cwe_sample(tokenizer, length: int, rng: random.Random, index: int = 0, n_common: int = 10,
               rare_freq: int = 3) -> RulerSample:
    """Common words extraction: a numbered list where ``n_common`` words repeat often, others 3 times."""
    b = _Builder(tokenizer, "cwe", length,
                 "Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.",
                 f"Question: What are the {n_common} most common words in the above list?",
                 f" Answer: The top {n_common} words that appear most often in the list are:")
    words = list(novel_words())
    rng.shuffle(words)
    common, rare = words[:n_common], words[n_common:]
    entries = b.budget // 5  # "123. word" is about 5 tokens
    freq = max(rare_freq + 1, min(30, int(0.4 * entries / n_common)))  # common words: up to 40% of the list
    if n_common * freq > 0.8 * entries:
        more = 5 * (int(n_common * freq / 0.8) - entries)
        raise ValueError(f"cwe: length {length} leaves room for {entries} list entries, too few for {n_common} "
                         f"words at {freq} repeats each; use a length of at least {length + more}")
    order_seed = rng.random()

    def make(n_rare: int) -> str:
        items = common * freq + [w for w in rare[:n_rare] for _ in range(rare_freq)]
        random.Random(order_seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    text, ids = b.fit(make, max(1, (entries - n_common * freq) // rare_freq))
    return b.sample(index, text, ids, common)


def fwe_sample(tokenizer, length: int, rng: random.Random, index: int = 0, alpha: float = 2.0,
               vocab: int = 300) -> RulerSample:
    """Frequent words extraction: coded words with zeta(``alpha``) counts; rank 0 is the noise "....";
    the answers are ranks 1-3."""
    b = _Builder(tokenizer, "fwe", length,
                 "Read the following coded text and track the frequency of each coded word. "
                 "Find the three most frequently appeared coded words.",
                 "Question: Do not provide any explanation. Please ignore the dots '....'. "
                 "What are the three most frequently appeared words in the above coded text?",
                 " Answer: According to the coded text above, the three most frequently appeared words are:")
    coded: list[str] = []
    while len(coded) < vocab:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in coded:
            coded.append(w)
    words = ["...."] + coded
    z = sum(1 / (k + 1) ** alpha for k in range(len(words)))
    order_seed = rng.random()

    def make(n: int) -> str:
        counts = [int(n * (1 / (k + 1) ** alpha) / z) for k in range(len(words))]
        items = [w for w, c in zip(words, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(items)
        return " ".join(items)

    text, ids = b.fit(make, b.budget // 3)
    return b.sample(index, text, ids, coded[:3])


def make_sample(tokenizer, task: str, length: int, seed: int, index: int) -> RulerSample:
    """Sample ``index`` of ``task`` at ``length``: its own RNG seeded by (seed, task, length, index),
    so a sample does not depend on which other tasks or lengths are generated."""
    rng = random.Random(f"ruler/{seed}/{task}/{length}/{index}")
    if task in NIAH:
        return niah_sample(tokenizer, task, length, rng, index)
    if task == "vt":
        return vt_sample(tokenizer, length, rng, index)
    if task == "cwe":
        return cwe_sample(tokenizer, length, rng, index)
    if task == "fwe":
        return fwe_sample(tokenizer, length, rng, index)
    raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")


def string_match_all(pred: str, answers: list[str]) -> float:
    """RULER's metric for the synthetic tasks: the fraction of the answers found in the output (case-insensitive)."""
    p = pred.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def string_match_part(pred: str, answers: list[str]) -> float:
    """RULER's QA metric: 1 if any answer is found in the output."""
    p = pred.lower()
    return float(any(a.lower() in p for a in answers))

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
import string

from .ruler_prompt import (RulerSample, _Builder, _distinct, _key, _unit_tokens, max_new_tokens,  # noqa: F401
                           novel_sentences, novel_words, string_match_all, string_match_part, tolerance)

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
TASKS = tuple(NIAH) + ("vt", "cwe", "fwe")


def niah_sample(tokenizer, task: str, length: int, rng: random.Random, index: int = 0) -> RulerSample:
    hay, kkind, vkind, n_keys, n_values, n_query = NIAH[task]
    t = vkind  # "numbers" | "uuids", as in the needle's sentence
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

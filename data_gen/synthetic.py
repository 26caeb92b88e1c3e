"""Synthetic instruction streams for testing and benchmarking dedup, reproducible from a seed.

Real instructions alone are mostly far apart, which makes dedup look easy. This mixes them with
the variants a teacher model actually produces and the edge cases of rouge-score's tokenizer:
exact and case-changed copies, punctuation noise, dropped / inserted / swapped / substituted
words, splices of two instructions, accented letters and other non-ASCII characters that the
ASCII tokenizer turns into separators (and the dotted capital I whose lowercase is two
characters), plus fresh random instructions.

Not for generation: nothing here talks to a teacher.
"""

from __future__ import annotations

import random

__all__ = ["instruction_stream"]

_FILLER = ("please", "briefly", "carefully", "now", "also", "the", "a", "of", "given", "following",
           "each", "short", "simple", "new", "best", "list", "explain", "describe", "write", "five")
_NON_ASCII = ("é", "ü", "ß", "İ", "K", "ｆ", "中文", "😀", "—", "\u00a0", "ø", "ﬁ")
_PUNCT = ("!", "?", ".", ",", ";", ":", "...", "\"", "'", "(", ")", "-")


def _words(text: str) -> list[str]:
    return text.split() or ["empty"]


def _variant(base: str, rng: random.Random, bases: list[str], vocab: list[str]) -> str:
    words = _words(base)
    kind = rng.randrange(12)
    if kind == 0:
        return base
    if kind == 1:
        return rng.choice([base.upper(), base.lower(), base.title(), base.swapcase()])
    if kind == 2:
        return " ".join(w + rng.choice(_PUNCT) if rng.random() < 0.3 else w for w in words)
    if kind == 3:
        for _ in range(rng.randint(1, 3)):
            if len(words) > 1:
                words.pop(rng.randrange(len(words)))
        return " ".join(words)
    if kind == 4:
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_FILLER))
        return " ".join(words)
    if kind == 5:
        if len(words) > 1:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    if kind == 6:
        for _ in range(rng.randint(1, 4)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        return " ".join(words)
    if kind == 7:
        other = _words(rng.choice(bases))
        cut, cut2 = rng.randint(0, len(words)), rng.randint(0, len(other))
        return " ".join(words[:cut] + other[cut2:])
    if kind == 8:
        chars = list(base)
        for _ in range(rng.randint(1, 3)):
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(_NON_ASCII))
        return "".join(chars)
    if kind == 9:
        return rng.choice(_NON_ASCII) + " " + base + " " + rng.choice(_NON_ASCII)
    if kind == 10:
        return base.replace("e", "é", rng.randint(1, 3)).replace("i", "İ", 1)
    # A fresh instruction: random words, usually far from everything.
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 25))).capitalize() + "."


def instruction_stream(bases: list[str], count: int, seed: int = 0,
                       variant_share: float = 0.5) -> list[str]:
    """`count` instructions: the real `bases` first (in order), then variants and fresh ones."""
    rng = random.Random(seed)
    vocab = sorted({w.strip(".,?!:;\"'()").lower() for b in bases for w in b.split()} - {""})
    vocab = vocab or list(_FILLER)
    out = list(bases[:count])
    while len(out) < count:
        if rng.random() < variant_share:
            out.append(_variant(rng.choice(out), rng, bases, vocab))
        else:
            out.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 30))).capitalize() + ".")
    return out

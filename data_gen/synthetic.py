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

__all__ = ["instruction_stream", "small_vocabulary_stream", "word_bag_stream"]

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


# A weak teacher's instructions: a few sentence frames filled from short word lists, plus its
# usual variants. Frames repeat their words in the same order, so many pairs share most of
# their words (and the rare slot words decide whether a pair is a near-duplicate).
_FRAMES = (
    "{verb} a {adj} {form} about {topic} for {audience}.",
    "{verb} {num} {adj} {things} about {topic}.",
    "Give me {num} tips on how to {activity} when {situation}.",
    "Explain how {topic} affects {topic2} in {place}.",
    "{verb} a {form} that explains {topic} to {audience} in {num} sentences.",
    "What are the {adj} {things} about {topic} that {audience} should know?",
    "Describe a {adj} day in {place} for {audience} who {activity}.",
    "Compare {topic} and {topic2} for {audience}, using {num} {things}.",
    "Rewrite the following {form} so that it is {adj} and fits {audience}.",
    "Suggest {num} ways to {activity} in {place} when {situation}.",
)
_SLOTS = {
    "verb": ("Write", "Create", "Generate", "Compose", "Draft", "Give", "Produce", "List"),
    "adj": ("short", "funny", "simple", "creative", "detailed", "formal", "friendly", "clear",
            "new", "surprising", "useful", "common", "important", "strange", "practical"),
    "form": ("poem", "story", "email", "essay", "letter", "summary", "tweet", "speech",
             "dialogue", "review", "report", "song", "riddle", "blog post", "news article"),
    "topic": ("climate change", "the ocean", "friendship", "artificial intelligence", "the moon",
              "healthy eating", "social media", "time management", "the history of rome",
              "renewable energy", "space travel", "video games", "music", "sleep", "exercise",
              "recycling", "money", "coffee", "cats", "volcanoes", "the internet", "gardening",
              "public transport", "chess", "photosynthesis", "the stock market", "rain"),
    "audience": ("children", "students", "teachers", "a manager", "my grandmother", "beginners",
                 "experts", "tourists", "a friend", "new employees", "parents", "scientists"),
    "num": ("three", "five", "ten", "two", "four", "seven"),
    "things": ("facts", "reasons", "examples", "questions", "ideas", "mistakes", "tips", "steps"),
    "activity": ("save money", "learn a language", "stay focused", "cook dinner", "travel",
                 "make friends", "write better", "sleep well", "run a marathon", "study"),
    "situation": ("you are tired", "it is raining", "time is short", "you work from home",
                  "the budget is small", "you feel stressed"),
    "place": ("a small town", "the city", "a school", "an office", "the mountains", "a hospital",
              "a library", "the desert", "a farm"),
}


def small_vocabulary_stream(count: int, seed: int = 0, variant_share: float = 0.2) -> list[str]:
    """`count` instructions from ten frames and ~150 slot words (`_FRAMES`, `_SLOTS`), with a
    share of the teacher's variants of earlier ones (`_variant`): reproducible from `seed`."""
    rng = random.Random(seed)
    words = sorted({w for values in _SLOTS.values() for v in values for w in v.lower().split()})
    out: list[str] = []
    while len(out) < count:
        if out and rng.random() < variant_share:
            out.append(_variant(rng.choice(out), rng, out[-50:], words))
            continue
        frame = rng.choice(_FRAMES)
        fill = {name: rng.choice(values) for name, values in _SLOTS.items()}
        fill["topic2"] = rng.choice(_SLOTS["topic"])
        out.append(frame.format(**fill))
    return out


# Content words for `word_bag_stream`: 30 stems x 8 endings.
_CONTENT = tuple(f"{stem}{suffix}" for stem in (
    "story", "poem", "email", "list", "idea", "plan", "tip", "way", "reason", "fact", "step",
    "word", "sentence", "question", "answer", "example", "topic", "recipe", "product", "city",
    "animal", "book", "movie", "song", "game", "team", "company", "user", "student", "teacher")
    for suffix in ("", "s", "ing", "er", "al", "ful", "less", "ly"))
_VERBS = ("write", "describe", "explain", "list", "give", "create", "generate", "summarize",
          "suggest", "find", "compare", "classify", "rewrite", "name", "identify")


def word_bag_stream(count: int, seed: int = 0, variant_share: float = 0.3) -> list[str]:
    """The hard case for overlap bounds: 6-24 words drawn from ~260 (content words weighted
    1/rank, a fifth from _FILLER) in random order, so most pairs share more words than their
    LCS; plus variants of earlier ones."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_CONTENT))]
    out: list[str] = []
    while len(out) < count:
        if out and rng.random() < variant_share:
            out.append(_variant(rng.choice(out), rng, out[-50:], list(_CONTENT)))
            continue
        words = [rng.choice(_VERBS)]
        for _ in range(rng.randint(5, 23)):
            words.append(rng.choice(_FILLER) if rng.random() < 0.2 else rng.choices(_CONTENT, weights)[0])
        out.append(" ".join(words).capitalize() + ".")
    return out

"""The prompt policy (docs/safety.md): blocked terms, the operator's file (KLEIN_PROMPT_BLOCKLIST) plus a tenant's
own, matched on a normalised prompt before anything is stored or queued.

Normalising: NFKC (full-width and compatibility forms), accents and invisible characters dropped, common
look-alike letters mapped to their Latin skeleton, case folded, every run of punctuation and spacing one space,
and runs of single letters ("n u d e", "n.u.d.e") joined. A term matches whole words only, so innocent words
that contain it ("classic", "Scunthorpe") pass; a plural "s" or "es" on its last word matches too.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

# Look-alikes that NFKC leaves alone: Cyrillic and Greek letters drawn like Latin ones, and the digits and signs
# used as letters. A small table on purpose: Unicode's full confusables list (what the `confusable-homoglyphs`
# package ships) maps far more, but not installed here; these cover the substitutions seen in filter evasion.
# fmt: off
SKELETON = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ԛ": "q",
        "ԝ": "w", "ү": "y", "һ": "h",
        # Greek
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
        "υ": "u", "χ": "x", "ω": "w", "ς": "s", "σ": "o", "μ": "u",
        # Latin look-alikes and letter-like signs
        "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ß": "ss", "æ": "ae", "œ": "oe",
        # Digits and signs written for letters
        "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s",
    }
)
# fmt: on
SEPARATORS = re.compile(r"[^a-z]+")


def normalise(text: str, article_apart: bool = False) -> list[str]:
    """The words a prompt (or a term) is matched by. `article_apart`: a run of single letters that starts with
    "a" or "i" ("a p u r p l e") keeps that first letter a word of its own."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) not in ("Mn", "Cf"))
    text = text.translate(SKELETON)
    joined: list[str] = []
    letters = ""
    for word in [*SEPARATORS.split(text), "end"]:  # "n u d e" → "nude"
        if len(word) == 1:
            letters += word
            continue
        if article_apart and len(letters) > 2 and letters[0] in "ai":
            joined += [letters[0], letters[1:]]
        elif letters:
            joined.append(letters)
        letters = ""
        if word:
            joined.append(word)
    return joined[:-1]


def _pattern(term: str) -> str | None:
    words = normalise(term)
    if not words:
        return None
    *head, last = (re.escape(word) for word in words)
    return r"(?<![a-z])" + " ".join([*head, f"{last}(?:e?s)?"]) + r"(?![a-z])"


@functools.lru_cache(maxsize=1024)
def compile_terms(terms: tuple[str, ...]) -> re.Pattern[str] | None:
    """One expression for a set of terms (cached: a tenant's list is compiled once per process)."""
    patterns = sorted({p for term in terms if (p := _pattern(term)) is not None})
    return re.compile("|".join(patterns)) if patterns else None


def blocked(prompt: str, terms: Iterable[str]) -> bool:
    pattern = compile_terms(tuple(terms))
    if pattern is None:
        return False
    return any(pattern.search(" ".join(normalise(prompt, apart))) is not None for apart in (False, True))


def read_terms(path: str | None) -> tuple[str, ...]:
    """The operator's file: one term or phrase a line; blank lines and `#` comments skipped."""
    if not path:
        return ()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))

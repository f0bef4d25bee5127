"""The prompt policy's matching (core/prompt_policy.py): look-alikes, spacing and punctuation variants of a blocked
term are caught; innocent words that merely contain one, or come near it, pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.prompt_policy import blocked, read_terms

TERMS = ["nude", "gore", "child abuse", "zorblax"]

CASES = [
    # (prompt, blocked?, why)
    ("a nude figure", True, "the word itself"),
    ("A NUDE figure", True, "case"),
    ("a ｎｕｄｅ figure", True, "full-width letters (NFKC)"),
    ("a nudе figure", True, "Cyrillic е"),
    ("a ηudε figure", True, "Greek η and ε"),
    ("a nüde figure", True, "an accent"),
    ("a nu\u200bde figure", True, "a zero-width space inside"),
    ("a n u d e figure", True, "spaced out"),
    ("a n.u.d.e figure", True, "dotted"),
    ("a nud3 figure", True, "a digit for a letter"),
    ("nudes at the beach", True, "plural"),
    ("CHILD-ABUSE", True, "a phrase joined by a hyphen"),
    ("ch1ld   abuse!!", True, "a phrase with a digit, spacing and punctuation"),
    ("a z o r b l a x", True, "spaced out after a lone article"),
    ("zorblaxes", True, "plural -es"),
    ("Scunthorpe is a classic town", False, "contains no blocked word"),
    ("denude the hillside", False, "a longer word containing the term"),
    ("nudeness", False, "a longer word"),
    ("a gory scene", False, "a near miss"),
    ("prudence and goretti", False, "near misses"),
    ("a child, abused", False, "the phrase's words apart"),
    ("zorblaxian art", False, "a longer word"),
    ("", False, "nothing"),
]


@pytest.mark.parametrize(("prompt", "expected", "why"), CASES, ids=[why for _, _, why in CASES])
def test_matching(prompt: str, expected: bool, why: str) -> None:
    assert blocked(prompt, TERMS) is expected, why


def test_no_terms_block_nothing() -> None:
    assert blocked("a nude figure", []) is False


def test_the_operator_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# operators' terms\n\n  nude  \nchild abuse\n   # indented comment\n", encoding="utf-8")
    assert read_terms(str(path)) == ("nude", "child abuse")
    assert read_terms(None) == ()

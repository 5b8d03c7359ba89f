"""Citation markers read back as passage numbers (pure)."""

from __future__ import annotations

import pytest

from rag.citations import citations_in, normalize_citations, strip_citations


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("", 3, []),
        ("No citations here.", 3, []),
        ("A [1]. B [2][3]. A again [1].", 3, [1, 2, 3]),
        ("Grouped [3, 1] and [2;3].", 3, [3, 1, 2]),
        ("Spaced [ 2 ] works.", 3, [2]),
        ("Invented [4] and [0] and [12] are ignored [1].", 3, [1]),
        ("Not citations: [a], [1a], [-1], (1), [[2]].", 3, [2]),
        ("Emoji 🌍 [2] and CJK 地球 [1]", 2, [2, 1]),
        ("Nothing was sent [1].", 0, []),
    ],
)
def test_citations_in(text: str, n: int, expected: list[int]) -> None:
    assert citations_in(text, n) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Plain [1] stays.", "Plain [1] stays."),
        ("Grouped [1, 2] splits.", "Grouped [1][2] splits."),
        ("Spaced [ 3 ] tidies.", "Spaced [3] tidies."),
        ("Words [see 1] stay.", "Words [see 1] stay."),
    ],
)
def test_normalize_citations(text: str, expected: str) -> None:
    assert normalize_citations(text) == expected


def test_strip_citations_for_the_history() -> None:
    assert strip_citations("Answer 9 [1], see [2, 3].") == "Answer 9, see."

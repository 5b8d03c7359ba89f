"""Citations: the ``[n]`` markers a model writes, read back as passage numbers.

Passages are numbered [1]..[n] in the order sent (``rag.prompting``), so ``[2]`` in an answer
is ``hits[1]``. A number outside 1..n was invented by the model and links nowhere. Pure.
"""

from __future__ import annotations

import re

_CITATION_GROUP = re.compile(r"\[(\s*\d{1,3}(?:\s*[,;]\s*\d{1,3})*\s*)\]")
_OLD_CITATION = re.compile(r"\s*\[\d{1,3}(?:\s*[,;]\s*\d{1,3})*\]")


def citations_in(text: str, n_passages: int) -> list[int]:
    """The passage numbers ``text`` cites, in order of first citation; numbers outside
    1..n_passages (invented by the model) are left out. ``[1, 3]`` cites 1 and 3.

    >>> citations_in("Turn it weekly [2][1]. Keep it moist [2, 7]. See [0].", 3)
    [2, 1]
    """
    seen: list[int] = []
    for match in _CITATION_GROUP.finditer(text):
        for part in re.split(r"[,;]", match.group(1)):
            number = int(part)
            if 1 <= number <= n_passages and number not in seen:
                seen.append(number)
    return seen


def normalize_citations(text: str) -> str:
    """Split grouped citations into single ones, ``[1, 2]`` -> ``[1][2]``, so that each number
    can be linked on its own.

    >>> normalize_citations("Moist [1, 2]; hot [3;9].")
    'Moist [1][2]; hot [3][9].'
    """

    def split(match: re.Match[str]) -> str:
        return "".join(f"[{p.strip()}]" for p in re.split(r"[,;]", match.group(1)))

    return _CITATION_GROUP.sub(split, text)


def strip_citations(text: str) -> str:
    """The text without its citation markers: for a turn kept in the history, whose numbers
    named that turn's passages and would mislead the model about the next turn's.

    >>> strip_citations("Weekly [1], see [2, 3].")
    'Weekly, see.'
    """
    return _OLD_CITATION.sub("", text)

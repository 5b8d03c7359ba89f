"""Scoring a reply against gold answers, as SQuAD does (pure).

- ``normalize_answer``: lower case, punctuation dropped, the articles a/an/the dropped,
  whitespace collapsed (SQuAD v1.1's evaluation script).
- ``is_correct``: some gold answer, normalised, is contained in the normalised reply as whole
  tokens (``" malay "`` is not in ``" malaysia "``); citation markers are stripped first, so a
  ``[1]`` never counts as the answer "1".
- ``token_f1``: SQuAD's token F1 against the best gold answer: forgiving of a long reply that
  holds the answer, and of a gold answer that restates the question.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable

_MARKERS = re.compile(r"\[\s*\d{1,3}(?:\s*[,;]\s*\d{1,3})*\s*\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def strip_markers(text: str) -> str:
    """The reply without its citation markers.

    >>> strip_markers("In 1832 [1][2], see [3, 4].")
    'In 1832 , see .'
    """
    return _MARKERS.sub("", text)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation.

    >>> normalize_answer("The  Malay language!")
    'malay language'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(reply: str, answers: Iterable[str]) -> bool:
    """Whether a gold answer is in the reply, as whole normalised tokens.

    >>> is_correct("It is Malaysia [1].", ["Malay"]), is_correct("Malay, mostly [2].", ["the Malay"])
    (False, True)
    >>> is_correct("See [1].", ["1"])
    False
    """
    said = f" {normalize_answer(strip_markers(reply))} "
    return any(f" {gold} " in said for gold in map(normalize_answer, answers) if gold)


def token_f1(reply: str, answers: Iterable[str]) -> float:
    """SQuAD token F1 of the reply against the best gold answer (0 when there is none).

    >>> round(token_f1("He was born in 1809 [1].", ["1809"]), 2), token_f1("", ["x"])
    (0.33, 0.0)
    """
    said = normalize_answer(strip_markers(reply)).split()
    best = 0.0
    for gold in answers:
        wanted = normalize_answer(gold).split()
        common = collections.Counter(said) & collections.Counter(wanted)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision, recall = overlap / len(said), overlap / len(wanted)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(texts: Iterable[str], answers: Iterable[str]) -> bool:
    """Whether some text holds a gold answer (the ceiling: was it in what the model read?).

    >>> contains_answer(["Lincoln was born in 1809."], ["1809"])
    True
    """
    answers = list(answers)
    return any(is_correct(text, answers) for text in texts)

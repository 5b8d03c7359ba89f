"""The answer scorer (rag.scoring) against hand-written cases."""

from __future__ import annotations

import pytest

from rag.scoring import contains_answer, is_correct, normalize_answer, strip_markers, token_f1


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Malay language.", "malay language"),
        ("An  apple, a PEAR & the fig!", "apple pear fig"),
        ("“Grace Bedell”", "“grace bedell”"),  # SQuAD drops ASCII punctuation only
        ("18 months", "18 months"),
        ("", ""),
    ],
)
def test_squad_normalisation(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    ("reply", "answers", "correct"),
    [
        ("The national language is Malay [1].", ["Malay"], True),
        ("Most people there speak Malaysian [1].", ["Malay"], False),  # whole tokens only
        ("It is spoken in Malaysia.", ["Malay"], False),
        ("He had about 18 months of formal schooling [2].", ["18 months"], True),
        ("See passage [1].", ["1"], False),  # a marker is not the answer "1"
        ("In 1832 [3][4], he ran for office.", ["1832"], True),
        ("In 18320 he ran.", ["1832"], False),
        ("Grace Bedell, an 11-year-old girl.", ["11-year-old Grace Bedell", "Grace Bedell."], True),
        ("The Pacific.", ["the Atlantic"], False),
        ("", ["anything"], False),
        ("Anything at all", [""], False),  # an empty gold answer matches nothing
    ],
)
def test_correct_means_a_gold_answer_in_the_reply_as_whole_tokens(reply: str, answers: list[str], correct: bool) -> None:
    assert is_correct(reply, answers) is correct


def test_markers_are_stripped_in_every_form() -> None:
    assert strip_markers("A [1], B [2, 3] C [ 4 ] D [5;6].") == "A , B  C  D ."
    assert strip_markers("Keep [a] and [1a].") == "Keep [a] and [1a]."


def test_token_f1_takes_the_best_gold_answer() -> None:
    assert token_f1("Malay", ["Malay", "the Malay language"]) == 1.0
    assert token_f1("The national language is Malay [1].", ["Malay"]) == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
    assert token_f1("Nothing like it.", ["Malay"]) == 0.0


def test_ceiling_looks_at_the_texts_sent() -> None:
    assert contains_answer(["[1] (a.txt)\nLincoln had 18 months of schooling.", "other"], ["18 months"])
    assert not contains_answer(["Lincoln had little schooling."], ["18 months"])

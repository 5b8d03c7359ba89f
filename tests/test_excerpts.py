"""Excerpts of the passages for the model (rag.excerpts): the sentences that matter, within a budget."""

from __future__ import annotations

from rag.excerpts import select_excerpts, word_scores
from rag.prompting import format_passage
from rag.types import Chunk, Hit
from tests.fakes import FakeEmbedder


def words(text: str) -> int:
    return len(text.split())


def hit(rank: int, text: str, source: str = "a.txt") -> Hit:
    return Hit(Chunk(f"c{rank}", source, text, 0, len(text)), 1.0 / rank, rank, similarity=0.5)


LINCOLN = hit(1, "Lincoln grew up on the frontier. He had little schooling. His formal education lasted about "
                 "18 months. He read widely on his own. Later he became a lawyer in Illinois.")  # fmt: skip
OTHER = hit(2, "Ducks are water birds. They are sometimes confused with loons and grebes. Ducks eat plants.",
            "Duck.txt")  # fmt: skip


def test_the_sentences_that_answer_are_kept_and_the_rest_left_out() -> None:
    kept = select_excerpts("How long did Lincoln's formal education last?", [LINCOLN, OTHER],
                           embed=FakeEmbedder().embed, count=words, budget=20)  # fmt: skip
    assert [h.chunk.id for h in kept] == ["c1"]  # nothing of the duck passage was worth its words
    excerpt = kept[0].excerpt
    assert excerpt is not None and "18 months" in excerpt and "frontier" not in excerpt
    assert excerpt.startswith("… ") and sum(words(h.excerpt or "") for h in kept) <= 20 + 2
    assert kept[0].chunk == LINCOLN.chunk  # a citation still opens the whole passage
    assert format_passage(1, kept[0]).endswith(excerpt)


def test_without_an_embedding_the_question_words_choose_as_the_app_does() -> None:
    kept = select_excerpts("How long did Lincoln's formal education last?", [LINCOLN, OTHER], count=words, budget=20)
    assert [h.chunk.id for h in kept] == ["c1"]
    excerpt = kept[0].excerpt
    assert excerpt is not None and "18 months" in excerpt and "frontier" not in excerpt and "Ducks" not in excerpt
    kept = select_excerpts("Which birds are ducks confused with?", [LINCOLN, OTHER], count=words, budget=16)
    assert [h.chunk.id for h in kept] == ["c2"] and "loons" in (kept[0].excerpt or "")


def test_each_sentence_brings_the_next_one_and_gaps_are_marked() -> None:
    kept = select_excerpts("Lincoln frontier", [LINCOLN], embed=FakeEmbedder().embed, count=words, budget=12)
    assert kept[0].excerpt == "Lincoln grew up on the frontier. He had little schooling. …"


def test_passages_that_fit_are_sent_whole_and_ranks_follow_what_is_sent() -> None:
    assert select_excerpts("x", [OTHER], embed=FakeEmbedder().embed, count=words, budget=100) == [OTHER]
    kept = select_excerpts("Which birds are ducks confused with?", [LINCOLN, OTHER], embed=FakeEmbedder().embed,
                           count=words, budget=12)  # fmt: skip
    assert [(h.chunk.id, h.rank) for h in kept] == [("c2", 1)]
    assert select_excerpts("x", [], embed=FakeEmbedder().embed, count=words) == []


def test_rare_question_words_count_most() -> None:
    scores = word_scores("Who invented the zorblax engine?", ["The zorblax was invented in 1901.",
                                                             "An engine was invented.", "Engines engine engine."])  # fmt: skip
    assert scores[0] > scores[1] > 0 and scores[2] < scores[0]


PLANETS = "## The planets\n\n| Planet | Type | Orbital period |\n|--------|------|----------------|\n" + "\n".join(
    f"| {name} | {kind} | {period} |" for name, kind, period in [
        ("Mercury", "Rocky", "88 days"), ("Venus", "Rocky", "225 days"), ("Earth", "Rocky", "365.25 days"),
        ("Mars", "Rocky", "687 days"), ("Jupiter", "Gas giant", "11.9 years"), ("Saturn", "Gas giant", "29.4 years"),
    ]) + "\n\nEvery orbit is an ellipse. Distances are averages."  # fmt: skip


def test_a_table_row_comes_with_its_header_row_on_lines_of_their_own() -> None:
    # 9 words (with the separator) for the header row, 9 for Mars's row, 10 for the next one
    kept = select_excerpts("What is the orbital period of Mars?", [hit(1, PLANETS, "planets.md")], count=words,
                           budget=28)  # fmt: skip
    assert kept[0].excerpt == "…\n| Planet | Type | Orbital period |\n| Mars | Rocky | 687 days |\n| Jupiter | Gas giant | 11.9 years |\n…"
    # the header counts against the budget: with room for it and one row, the next row stays out
    kept = select_excerpts("What is the orbital period of Mars?", [hit(1, PLANETS, "planets.md")], count=words,
                           budget=18)  # fmt: skip
    assert kept[0].excerpt == "…\n| Planet | Type | Orbital period |\n| Mars | Rocky | 687 days |\n…"


def test_rows_of_a_passage_that_starts_below_the_header_get_the_passages_table_header() -> None:
    rows = PLANETS[PLANETS.index("| Earth"):]
    below = Hit(Chunk("c2", "planets.md", rows, 0, len(rows), table_header="| Planet  | Type | Orbital period |"),
                0.5, 1)  # fmt: skip
    kept = select_excerpts("How long is a year on Saturn?", [below], count=words, budget=20)
    assert kept[0].excerpt == "| Planet | Type | Orbital period |\n| Saturn | Gas giant | 29.4 years |\n…"
    # sent whole, the passage is shown with the header row above its rows
    whole = select_excerpts("Saturn", [below], count=words, budget=500)[0]
    assert format_passage(1, whole) == f"Document 1 (planets.md):\n| Planet  | Type | Orbital period |\n{rows}"


def test_a_header_row_or_a_rule_line_is_never_sent_alone() -> None:
    # The header row matches best, but the budget has no room for it with a row: prose instead
    kept = select_excerpts("Which type and orbital period?", [hit(1, PLANETS, "planets.md")], count=words, budget=12)
    assert kept[0].excerpt == "… Every orbit is an ellipse. Distances are averages."


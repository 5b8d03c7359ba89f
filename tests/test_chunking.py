"""Chunking: structure first, exact offsets, overlap within bounds, and the token bound.

Most tests count tokens with the fake embedder's word tokenizer (words + 2 special tokens);
the slow ones use the real model's tokenizer as the oracle for the window bound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from rag.chunking import (
    MAX_CHARS_PER_TOKEN,
    chunk_id,
    context_prefix,
    embedding_text,
    split_document,
    split_documents,
    with_table_header,
)
from rag.types import Chunk, Document
from tests.fakes import FakeEmbedder

count_words = FakeEmbedder().count_tokens


def subword_count(text: str) -> int:
    """A crude subword tokenizer: a word costs one token per 4 characters, plus 2 specials."""
    return sum(math.ceil(len(word) / 4) for word in text.split()) + 2


def merging_count(text: str) -> int:
    """Not additive: two neighbouring words share a token, so summed counts of parts run high
    or low against the whole, and the chunker must rely on its final, real count."""
    words = text.split()
    return (len(words) + 1) // 2 + sum(len(word) // 7 for word in words) + 3


def split(
    doc: Document,
    *,
    max_tokens: int = 20,
    overlap_tokens: int = 0,
    count_tokens: Callable[[str], int] = count_words,
    window: int | None = None,
) -> list[Chunk]:
    return split_document(
        doc, max_tokens=max_tokens, overlap_tokens=overlap_tokens, count_tokens=count_tokens, window=window
    )


def texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks]


def assert_invariants(
    doc: Document,
    chunks: list[Chunk],
    *,
    limit: int,
    max_tokens: int | None = None,
    count: Callable[[str], int] = count_words,
) -> None:
    """Offsets exact and stripped, bound held, chunks in order, all non-whitespace covered."""
    covered = [False] * len(doc.text)
    for c in chunks:
        assert c.text == doc.text[c.start : c.end]
        assert c.text and c.text == c.text.strip()
        tokens = count(embedding_text(c))
        assert tokens <= limit, c
        if max_tokens is not None:  # the exact bound from the module docstring
            prefix = context_prefix(c.title, c.headings) + with_table_header(c.table_header, "")
            p = count(prefix) - count("") if prefix else 0
            assert tokens <= p + min(max_tokens, limit - p), c
        assert c.id == chunk_id(doc.source, doc.page, c.start, c.text)
        assert (c.source, c.page) == (doc.source, doc.page)
        covered[c.start : c.end] = [True] * (c.end - c.start)
    lost = [i for i, ch in enumerate(doc.text) if not ch.isspace() and not covered[i]]
    assert lost == [], f"uncovered text at {lost[:5]}: {doc.text[lost[0] : lost[0] + 40]!r}"
    assert all(b.start > a.start and b.end > a.end for a, b in zip(chunks, chunks[1:], strict=False))


@pytest.mark.parametrize("text", ["", " ", "\n\n\t  \n", "\u3000\n"])
def test_empty_or_whitespace_document_gives_no_chunks(text: str) -> None:
    doc = Document("blank.md", text, sections=((0, ("Heading",)),) if text else ())
    assert split(doc) == []


def test_short_document_is_one_chunk_with_metadata() -> None:
    doc = Document("guide.pdf", "  Turn the pile weekly.\n", page=3, title="Composting guide")
    chunk = Chunk(
        id=chunk_id("guide.pdf", 3, 2, "Turn the pile weekly."),
        source="guide.pdf",
        text="Turn the pile weekly.",
        start=2,
        end=23,
        page=3,
        title="Composting guide",
    )
    assert split(doc) == [chunk]
    assert embedding_text(chunk) == "Composting guide\nTurn the pile weekly."


def test_sections_are_never_crossed_and_carry_their_heading_path() -> None:
    text = "Intro words here.\n# Guide\nGuide text.\n## Turning the pile\nTurn it weekly.\n"
    sections = ((18, ("Guide",)), (38, ("Guide", "Turning the pile")))
    doc = Document("c.md", text, title="Composting", sections=sections)
    chunks = split(doc, max_tokens=200)
    assert [(c.text, c.headings) for c in chunks] == [
        ("Intro words here.", ()),
        ("# Guide\nGuide text.", ("Guide",)),
        ("## Turning the pile\nTurn it weekly.", ("Guide", "Turning the pile")),
    ]
    assert embedding_text(chunks[2]) == "Composting > Guide > Turning the pile\n## Turning the pile\nTurn it weekly."


def test_paragraphs_are_packed_greedily_and_never_cut_when_they_fit() -> None:
    paragraphs = ["one two three", "four five six seven", "eight nine ten eleven", "twelve thirteen"]
    doc = Document("p.md", "\n\n".join(paragraphs))
    # 12 tokens, 2 of them special: 10 words of room per chunk.
    assert texts(split(doc, max_tokens=12)) == [
        "one two three\n\nfour five six seven",
        "eight nine ten eleven\n\ntwelve thirteen",
    ]


def test_too_big_paragraph_is_cut_at_sentences() -> None:
    text = "Alpha beta gamma delta. Epsilon zeta eta theta. Iota kappa lambda. Mu nu xi omicron pi."
    assert texts(split(Document("s.md", text), max_tokens=12)) == [
        "Alpha beta gamma delta. Epsilon zeta eta theta.",
        "Iota kappa lambda. Mu nu xi omicron pi.",
    ]


def test_sentence_splitting_keeps_abbreviations_and_lowercase_continuations() -> None:
    text = "Dr. Smith met Mr. Jones at 5 p.m. today. It works, e.g. in soil. Next one? Yes! 日本語です。次の文。"
    chunks = split(Document("a.md", text), max_tokens=12)
    assert texts(chunks) == [
        "Dr. Smith met Mr. Jones at 5 p.m. today.",
        "It works, e.g. in soil. Next one? Yes! 日本語です。",
        "次の文。",
    ]


def test_table_is_cut_between_rows() -> None:
    rows = ["| name | colour | size |", "| --- | --- | --- |"] + [f"| item{i} | red. Blue | {i} |" for i in range(12)]
    doc = Document("t.md", "Sizes:\n" + "\n".join(rows))
    chunks = split(doc, max_tokens=24)
    assert len(chunks) > 1
    for c in chunks:
        for line in c.text.splitlines():
            assert line == "Sizes:" or line in rows, line
    assert_invariants(doc, chunks, limit=24)


def test_rows_cut_from_their_table_keep_its_header_row() -> None:
    header = "| name | colour | size |"
    rows = [header, "| --- | --- | --- |"] + [f"| item{i} | red | {i} |" for i in range(12)]
    doc = Document("t.md", "Sizes.\n\n" + "\n".join(rows) + "\n\nAfter the table.", title="T")
    chunks = split(doc, max_tokens=20, window=40)  # the window leaves room beside the text, as the app's does
    inside = [c for c in chunks if c.text.startswith("| item")]
    assert len(inside) >= 2 and all(c.table_header == header for c in inside)
    assert all(c.table_header == "" for c in chunks if not c.text.startswith("| item"))  # the header's own, prose
    assert embedding_text(inside[-1]) == f"T\n{header}\n{inside[-1].text}"
    assert_invariants(doc, chunks, limit=40, max_tokens=20)
    # Where the window leaves no room for the header, the chunk goes without it (the bound holds)
    wide = "| " + " | ".join(f"column{i}" for i in range(12)) + " |"
    doc = Document("w.md", "\n".join([wide] + [f"| {i} | x |" for i in range(30)]))
    chunks = split(doc, max_tokens=14, window=16)
    assert len(chunks) > 2 and all(c.table_header == "" for c in chunks)
    assert_invariants(doc, chunks, limit=16, max_tokens=14)


def test_giant_word_is_cut_so_the_bound_holds() -> None:
    blob = "".join(random.Random(1).choice("ABCDEFabcdef0123456789+/") for _ in range(5000))
    doc = Document("b.md", f"Before the blob.\n\n{blob}\n\nhttps://example.com/{'a' * 900}/end after.")
    for count in (count_words, subword_count):
        chunks = split(doc, max_tokens=30, count_tokens=count)
        assert_invariants(doc, chunks, limit=30, count=count)
        assert all(len(c.text) <= 30 * MAX_CHARS_PER_TOKEN for c in chunks)
        assert chunks[0].text == "Before the blob."


def test_overlap_repeats_whole_trailing_sentences_within_the_bound() -> None:
    sentences = [f"Sentence {i} has some words." for i in range(30)]
    doc = Document("o.md", " ".join(sentences))
    chunks = split(doc, max_tokens=30, overlap_tokens=12)
    shared = [doc.text[b.start : a.end] for a, b in zip(chunks, chunks[1:], strict=False)]
    assert all(shared)
    for text in shared:
        assert count_words(text) - 2 <= 12
        assert text.startswith("Sentence ") and text.endswith(".")
    assert_invariants(doc, chunks, limit=30)


def test_overlap_falls_back_to_words_for_one_long_sentence() -> None:
    doc = Document("w.md", " ".join(f"w{i}" for i in range(200)))
    chunks = split(doc, max_tokens=30, overlap_tokens=5)
    pairs = list(zip(chunks, chunks[1:], strict=False))
    assert pairs
    for a, b in pairs:
        shared = doc.text[b.start : a.end]
        assert 0 < count_words(shared) - 2 <= 5
    assert_invariants(doc, chunks, limit=30)


def test_overlap_zero_means_no_shared_text() -> None:
    doc = Document("z.md", " ".join(f"Sentence {i} is here." for i in range(40)))
    chunks = split(doc, max_tokens=20, overlap_tokens=0)
    assert len(chunks) > 2
    assert all(b.start >= a.end for a, b in zip(chunks, chunks[1:], strict=False))


def test_overlap_never_crosses_a_section() -> None:
    text = "# A\n" + "Words in a. " * 20 + "\n# B\n" + "Words in b. " * 20
    doc = Document("x.md", text, sections=((0, ("A",)), (text.index("# B"), ("B",))))
    chunks = split(doc, max_tokens=25, overlap_tokens=8)
    boundary = text.index("# B")
    assert all(c.end <= boundary or c.start >= boundary for c in chunks)
    assert_invariants(doc, chunks, limit=25)


def test_prefix_counts_against_the_window() -> None:
    doc = Document("long.md", "word " * 500, title="Title words", sections=((0, ("Head one", "Head two")),))
    chunks = split(doc, max_tokens=40, window=48)
    assert all(c.headings == ("Head one", "Head two") and c.title == "Title words" for c in chunks)
    assert max(count_words(embedding_text(c)) for c in chunks) <= 48
    assert max(count_words(c.text) for c in chunks) <= 40


def test_too_long_prefix_loses_leading_headings_then_the_title() -> None:
    long_heading = " ".join(["deep"] * 30)
    path = (long_heading, "Middle", "Leaf")
    doc = Document("h.md", "Body text. " * 50, title="Guide", sections=((0, path),))
    chunks = split(doc, max_tokens=40)
    assert {(c.title, c.headings) for c in chunks} == {("Guide", ("Middle", "Leaf"))}
    huge_title = " ".join(["title"] * 30)
    chunks = split(Document("h.md", "Body text. " * 50, title=huge_title, sections=((0, path),)), max_tokens=40)
    assert {(c.title, c.headings) for c in chunks} == {("", ())}
    assert "".join(texts(chunks)).replace(" ", "") == ("Body text. " * 50).replace(" ", "")


def test_without_window_the_bound_is_max_tokens() -> None:
    doc = Document("n.md", "Some words here. " * 100, title="A title", sections=((0, ("Head",)),))
    chunks = split(doc, max_tokens=30, overlap_tokens=5)
    assert_invariants(doc, chunks, limit=30)


def test_ids_are_stable_and_distinct() -> None:
    assert chunk_id("a.md", None, 0, "x") == chunk_id("a.md", None, 0, "x")
    variants = {
        chunk_id("a.md", None, 0, "x"),
        chunk_id("b.md", None, 0, "x"),
        chunk_id("a.md", 1, 0, "x"),
        chunk_id("a.md", None, 1, "x"),
        chunk_id("a.md", None, 0, "y"),
    }
    assert len(variants) == 5
    doc = Document("r.md", "Same sentence again. " * 60)
    first, second = split(doc, overlap_tokens=4), split(doc, overlap_tokens=4)
    assert first == second
    assert len({c.id for c in first}) == len(first)


def test_split_documents_concatenates_in_order() -> None:
    docs = [Document("a.md", "Alpha text."), Document("b.md", ""), Document("c.md", "Gamma text.")]
    chunks = split_documents(docs, max_tokens=20, overlap_tokens=0, count_tokens=count_words)
    assert [(c.source, c.text) for c in chunks] == [("a.md", "Alpha text."), ("c.md", "Gamma text.")]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_tokens": 8}, "too little room"),
        ({"max_tokens": 100, "window": 10}, "too little room"),
        ({"max_tokens": 20, "overlap_tokens": 20}, "overlap_tokens=20"),
        ({"max_tokens": 20, "overlap_tokens": -1}, "overlap_tokens=-1"),
    ],
)
def test_bad_parameters_are_refused(options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split(Document("a.md", "text"), **options)


def test_context_prefix_skips_empty_parts() -> None:
    assert context_prefix("", ("A", "B")) == "A > B\n"
    assert context_prefix("T", ()) == "T\n"


VOCABULARY = [
    "the", "pile", "compost", "Turn", "weekly.", "Really?", "Yes!", "e.g.", "Dr.", "42", "3.14",
    "😀", "👩‍👩‍👧", "日本語の文章です。", "中文句子。", "Ünïcödé", "naïve", "—", "https://example.com/a/b?c=d",
    "x" * 300, "| a | b |", "- item", "# Heading", "`code()`",
]  # fmt: skip


def random_document(rng: random.Random) -> Document:
    parts: list[str] = []
    for _ in range(rng.randint(0, 400)):
        parts.append(rng.choice(VOCABULARY))
        parts.append(rng.choice([" ", " ", " ", "\n", "\n\n", "  ", "\n \n", ""]))
    text = "".join(parts)
    starts = sorted(rng.sample(range(len(text)), k=min(len(text), rng.randint(0, 4))))
    sections = tuple((s, tuple(f"H{i}" for i in range(rng.randint(1, 3)))) for s in starts)
    return Document("gen.md", text, page=rng.choice([None, 2]), title=rng.choice(["", "Generated"]), sections=sections)


@pytest.mark.parametrize("seed", range(60))
def test_invariants_hold_for_generated_documents(seed: int) -> None:
    rng = random.Random(seed)
    doc = random_document(rng)
    max_tokens = rng.choice([14, 16, 30, 64])
    overlap = rng.randint(0, max_tokens - 1)
    window = rng.choice([None, max_tokens, max_tokens + 10])
    count = rng.choice([count_words, subword_count, merging_count])
    chunks = split(doc, max_tokens=max_tokens, overlap_tokens=overlap, window=window, count_tokens=count)
    assert_invariants(doc, chunks, limit=window or max_tokens, max_tokens=max_tokens, count=count)
    assert chunks == split(doc, max_tokens=max_tokens, overlap_tokens=overlap, window=window, count_tokens=count)
    section_starts = [0] + [s for s, _ in doc.sections] + [len(doc.text)]
    for c in chunks:
        assert not any(c.start < s < c.end and doc.text[s:c.end].strip() for s in section_starts)


def test_a_megabyte_is_chunked_in_linear_time() -> None:
    calls: list[int] = []

    def counting(text: str) -> int:
        calls.append(len(text))
        return count_words(text)

    paragraph = " ".join(f"Sentence number {i} talks about compost and soil." for i in range(12))
    doc = Document("big.md", "\n\n".join([paragraph] * 1800))
    assert len(doc.text) > 1_000_000
    chunks = split(doc, max_tokens=200, overlap_tokens=40, window=256, count_tokens=counting)
    assert_invariants(doc, chunks, limit=256)
    assert sum(calls) < 4 * len(doc.text)


LONG_MIXED_TEXT = """# Composting guide

Compost is decomposed organic matter. It feeds the soil, holds water and suppresses some plant
diseases. Dr. Smith's 2019 study measured 3.5 kg of CO2 saved per 10 kg of kitchen waste, e.g.
peelings, coffee grounds and egg shells.

## Turning the pile

Turn the pile every 7-10 days; a 1.2 m x 1.2 m heap reaches 55-65 °C in the core. Read more at
https://example.com/very/long/path/{segments}?query=compost&utm_source=newsletter&utm_medium=email&id=0123456789abcdef

| Material | Carbon:Nitrogen | Notes |
| --- | --- | --- |
{rows}

## Auf Deutsch

Kompostierung ist ein natürlicher Prozess. Mikroorganismen zersetzen organische Abfälle zu Humus.
Donaudampfschifffahrtsgesellschaftskapitänsmützenabzeichen ist ein sehr langes Wort.

## 日本語

堆肥は有機物を分解したものです。土壌を豊かにし、水分を保ちます。家庭の生ごみから作ることができます。

## Русский

Компост — это разложившееся органическое вещество. Он питает почву и удерживает влагу.

Numbers: {numbers}

Emoji: 🌱🪱🍂♻️ {emoji}

Blob: {blob}
"""


@pytest.mark.slow
def test_real_tokenizer_keeps_every_chunk_inside_the_window() -> None:
    from rag.embedding import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder()
    rng = random.Random(7)
    text = LONG_MIXED_TEXT.format(
        segments="/".join(f"segment-{i}-{rng.randrange(10**6)}" for i in range(150)),
        rows="\n".join(f"| material {i} | {rng.randint(10, 500)}:1 | keep it moist, turn it often |" for i in range(80)),
        numbers=" ".join(f"{rng.random() * 10**rng.randint(1, 9):.4f}" for _ in range(400)),
        emoji="".join(rng.choice("😀🎉🌍🔥👍🏽👩‍🔬🇩🇪") for _ in range(600)),
        blob="".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(6000)),
    ) * 3
    heading_starts = [i for i in range(len(text)) if text.startswith("#", i) and (i == 0 or text[i - 1] == "\n")]
    sections = tuple((i, (text[i : text.index("\n", i)].lstrip("# "),)) for i in heading_starts)
    doc = Document("guide.md", text, title="Composting guide", sections=sections)

    chunks = split_document(doc, max_tokens=200, overlap_tokens=40, count_tokens=embedder.count_tokens, window=256)

    assert_invariants(doc, chunks, limit=256, max_tokens=200, count=embedder.count_tokens)
    assert max(embedder.count_tokens(embedding_text(c)) for c in chunks) > 150  # chunks are not starved


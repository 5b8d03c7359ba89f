"""Excerpts: the sentences of the retrieved passages that matter for the question, within a budget.

A small local model reads its prompt at ~80 tokens/s on two cores, so every token sent is time
before the first word of the answer; and it answers better from a few sentences than from five
whole passages it has to search. ``select_excerpts`` scores every sentence of the passages
against the question and keeps the best ones until ``budget`` tokens are spent:

- a sentence's score is its words: the share of the question's stemmed content words it
  contains, weighted by their rarity among the sentences (names, numbers and rare terms count
  most). Given ``embed``, its meaning is added too (cosine similarity of its embedding to the
  question's, ``word_weight`` weighing the words). The app passes none: on 120 and 169 qa-dev
  questions the words alone kept as many gold answers as words + meaning (95 vs 93 of 120,
  131 vs 133 of 169, at 260 tokens), and embedding the passages' ~40 sentences cost ~400 ms on
  two cores before every first token (bench/chat_latency, docs/benchmarks.md);
- each kept sentence brings the sentence after it when that fits too (an answer often follows
  the sentence that names the subject: "He was born in 1809. His father was …");
- a table row brings its table's header row (from the passage, or the ``table_header`` of a
  passage that starts below it), counted in the budget, and rows stay on lines of their own:
  "| Neptune | Ice giant | 30.1 | 165 years | 49,528 |" alone does not say what 30.1 is;
- the passages keep their retrieval order and their sentences their order in the passage;
  gaps are marked with "…"; a passage with nothing kept is not sent at all.

The budget, 200 tokens for all passages together, was measured on qa-dev (docs/evaluation.md):
between ~220 and ~460 prompt tokens the 0.5B default model answers about as well (more text
holds more answers but gives it more neighbouring facts to pick instead), and 200 answered 183
of 338 against 177 at 260, its first token ~0.6 s sooner on two cores.

The hits come back with ``excerpt`` set (what the model reads); their ``chunk`` is untouched,
so a citation still opens the whole passage. Pure: an embedding, if any, comes in as a function.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from rag.chunking import is_table_rule, sentence_spans, table_start
from rag.keyword import tokenize
from rag.prompting import TokenCounter
from rag.types import Hit

# Words that ask rather than say what is asked about (as tokenize() leaves them).
QUESTION_WORDS = frozenset("when what who how which where whi whom whose did do doe mani much".split())
DEFAULT_BUDGET = 200  # tokens of passage text sent to the model
DEFAULT_WORD_WEIGHT = 0.5
GAP = " … "

Embed = Callable[[Sequence[str]], np.ndarray]
"""Unit vectors for texts (``Embedder.embed``)."""


@dataclasses.dataclass(frozen=True)
class Sentence:
    hit: int  # index into the hits
    order: int  # position in its passage
    text: str
    score: float = 0.0
    table: int = -1  # a table row: where its table starts in the passage (-1: not a row)


def passage_sentences(hits: Sequence[Hit]) -> list[Sentence]:
    """Every sentence of every passage, in order; a table row is one, whitespace collapsed.

    >>> from rag.types import Chunk
    >>> [s.text for s in passage_sentences([Hit(Chunk("c", "a.md", "One. Two!", 0, 9), 1.0, 1)])]
    ['One.', 'Two!']
    """
    out = []
    for index, hit in enumerate(hits):
        text = hit.chunk.text
        for order, (start, end) in enumerate(sentence_spans(text)):
            out.append(Sentence(index, order, " ".join(text[start:end].split()), table=table_start(text, start)))
    return out


def _row_headers(hits: Sequence[Hit], sentences: Sequence[Sentence]) -> dict[tuple[int, int], tuple[int, int] | str]:
    """For each table row below its table's header: the header, as the key of the sentence that
    is the header row, or as the passage's ``table_header`` text when the rows run up to the
    start of the passage and the header stayed in an earlier one."""
    first_of: dict[tuple[int, int], int] = {}  # (hit, table start) -> order of its first row
    headers: dict[tuple[int, int], tuple[int, int] | str] = {}
    for s in sentences:
        if s.table < 0:
            continue
        first = first_of.setdefault((s.hit, s.table), s.order)
        outside = " ".join(hits[s.hit].chunk.table_header.split()) if s.table == 0 else ""
        if outside:
            headers[(s.hit, s.order)] = outside
        elif first != s.order:
            headers[(s.hit, s.order)] = (s.hit, first)
    return headers


def word_scores(question: str, sentences: Sequence[str]) -> list[float]:
    """The share of the question's content words (stemmed) each sentence holds, each word
    weighted by its inverse frequency among the sentences.

    >>> [round(s, 2) for s in word_scores("When was Lincoln born?", ["Lincoln was born in 1809.", "He died.",
    ...                                                                 "Lincoln spoke."])]
    [1.0, 0.0, 0.43]
    """
    wanted = set(tokenize(question)) - QUESTION_WORDS
    if not wanted or not sentences:
        return [0.0] * len(sentences)
    bags = [set(tokenize(s)) for s in sentences]
    frequency = Counter(term for bag in bags for term in bag if term in wanted)
    weights = {t: math.log(1 + len(sentences) / (1 + frequency[t])) for t in wanted}
    total = sum(weights.values())
    return [sum(weights[t] for t in wanted & bag) / total for bag in bags]


def select_excerpts(
    question: str,
    hits: Sequence[Hit],
    *,
    embed: Embed | None = None,
    count: TokenCounter,
    budget: int = DEFAULT_BUDGET,
    word_weight: float = DEFAULT_WORD_WEIGHT,
) -> list[Hit]:
    """The passages to send, each with ``excerpt`` set to its best sentences, best passages
    first as retrieved, within ``budget`` tokens in all; passages with no sentence kept are
    left out. Hits whose text fits the budget whole are sent whole.
    """
    if not hits:
        return []
    if sum(count(h.chunk.text) for h in hits) <= budget:
        return list(hits)
    sentences = passage_sentences(hits)
    texts = [s.text for s in sentences]
    words = word_scores(question, texts)
    if embed is None:
        meaning, word_weight = np.zeros(len(texts)), 1.0
    else:
        vectors = embed([question, *texts])
        meaning = vectors[1:] @ vectors[0]
    scored = [dataclasses.replace(s, score=float(m) + word_weight * w) for s, m, w in zip(sentences, meaning, words)]
    by_key = {(s.hit, s.order): s for s in scored}
    headers = _row_headers(hits, scored)
    # A header row comes with its rows, never alone; a |---|---| line carries nothing.
    passed_over = {h for h in headers.values() if isinstance(h, tuple)}
    passed_over |= {k for k, s in by_key.items() if s.table >= 0 and is_table_rule(s.text)}
    kept: set[tuple[int, int]] = set()
    outside: dict[int, str] = {}  # hit -> the table header its excerpt starts with
    spent = 0
    for sentence in sorted(scored, key=lambda s: -s.score):
        for key in ((sentence.hit, sentence.order), (sentence.hit, sentence.order + 1)):
            if key in kept or key not in by_key or key in passed_over:
                continue
            # A table row brings its header row, so its cells keep their column names.
            header = headers.get(key)
            needs = [header] if isinstance(header, tuple) and header not in kept else []
            extra = header if isinstance(header, str) and key[0] not in outside else ""
            cost = sum(count(by_key[k].text) + 1 for k in [*needs, key]) + (count(extra) + 1 if extra else 0)
            if spent + cost > budget:
                break
            kept.update([*needs, key])
            if extra:
                outside[key[0]] = extra
            spent += cost
        if spent >= budget:
            break
    out = []
    for index, hit in enumerate(hits):
        orders = sorted(order for h, order in kept if h == index)
        if not orders:
            continue
        excerpt, previous = "", None
        if index in outside:  # the header row of the table the passage starts inside
            excerpt, previous = outside[index], Sentence(index, -1, outside[index], table=0)
        elif orders[0] > 0:
            excerpt = "…\n" if by_key[(index, orders[0])].table >= 0 else "… "
        for order in orders:
            sentence = by_key[(index, order)]
            excerpt += _separator(previous, sentence) + sentence.text
            previous = sentence
        last = max(s.order for s in scored if s.hit == index)
        if orders[-1] < last:
            excerpt += "\n…" if by_key[(index, orders[-1])].table >= 0 else " …"
        out.append(dataclasses.replace(hit, excerpt=excerpt.strip()))
    return [dataclasses.replace(h, rank=i) for i, h in enumerate(out, start=1)]


def _separator(previous: Sentence | None, sentence: Sentence) -> str:
    """What goes between two kept sentences of a passage: a space, or a line break around a
    table row; "…" where sentences were left out between them (not between the rows of one
    table: its header row, then the rows asked about, reads as a table)."""
    if previous is None:
        return ""
    same_table = sentence.table >= 0 and sentence.table == previous.table
    rows = sentence.table >= 0 or previous.table >= 0
    if same_table or sentence.order == previous.order + 1:
        return "\n" if rows else " "
    return "\n…\n" if rows else GAP

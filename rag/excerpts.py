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
- the passages keep their retrieval order and their sentences their order in the passage;
  gaps are marked with "…"; a passage with nothing kept is not sent at all.

The hits come back with ``excerpt`` set (what the model reads); their ``chunk`` is untouched,
so a citation still opens the whole passage. Pure: an embedding, if any, comes in as a function.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from rag.chunking import sentence_spans
from rag.keyword import tokenize
from rag.prompting import TokenCounter
from rag.types import Hit

# Words that ask rather than say what is asked about (as tokenize() leaves them).
QUESTION_WORDS = frozenset("when what who how which where whi whom whose did do doe mani much".split())
DEFAULT_BUDGET = 260  # tokens of passage text sent to the model
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


def passage_sentences(hits: Sequence[Hit]) -> list[Sentence]:
    """Every sentence of every passage, in order.

    >>> from rag.types import Chunk
    >>> [s.text for s in passage_sentences([Hit(Chunk("c", "a.md", "One. Two!", 0, 9), 1.0, 1)])]
    ['One.', 'Two!']
    """
    out = []
    for index, hit in enumerate(hits):
        text = hit.chunk.text
        for order, (start, end) in enumerate(sentence_spans(text)):
            out.append(Sentence(index, order, " ".join(text[start:end].split())))
    return out


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
    kept: set[tuple[int, int]] = set()
    spent = 0
    by_key = {(s.hit, s.order): s for s in scored}
    for sentence in sorted(scored, key=lambda s: -s.score):
        for key in ((sentence.hit, sentence.order), (sentence.hit, sentence.order + 1)):
            if key in kept or key not in by_key:
                continue
            cost = count(by_key[key].text) + 1
            if spent + cost > budget:
                break
            kept.add(key)
            spent += cost
        if spent >= budget:
            break
    out = []
    for index, hit in enumerate(hits):
        orders = sorted(order for h, order in kept if h == index)
        if not orders:
            continue
        parts, previous = [], None
        for order in orders:
            if previous is not None and order != previous + 1:
                parts.append(GAP.strip())
            parts.append(by_key[(index, order)].text)
            previous = order
        last = max(s.order for s in scored if s.hit == index)
        excerpt = ("… " if orders[0] > 0 else "") + " ".join(parts) + (" …" if orders[-1] < last else "")
        out.append(dataclasses.replace(hit, excerpt=excerpt))
    return [dataclasses.replace(h, rank=i) for i, h in enumerate(out, start=1)]

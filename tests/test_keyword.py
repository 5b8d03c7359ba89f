from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from rag.errors import IndexMismatchError, IndexMissingError
from rag.keyword import DEFAULT_B, DEFAULT_K1, KeywordIndex, tokenize


def bm25(tf: int, df: int, length: int, *, n_docs: int, avg_length: float, k1: float, b: float) -> float:
    """One term's Okapi BM25 score, straight from the formula (Lucene's idf)."""
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg_length))


def fullwidth(ascii_text: str) -> str:
    """ASCII as full-width forms (U+FF01 on), as some CJK documents write Latin letters and digits."""
    return "".join(chr(ord(char) + 0xFEE0) for char in ascii_text)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("The ﬁrst editions of 1876", ["first", "edit", "1876"]),
        ("running runs ran", ["run", "run", "ran"]),
        ("Die Straße in München, CAFÉ 東京 😀", ["die", "straße", "münchen", "café", "東京"]),
        (f"{fullwidth('Fullwidth')} {fullwidth('ABC123')}", ["fullwidth", "abc123"]),
        ("v1.2.3 E42", ["v1", "2", "3", "e42"]),
        ("the of and to be", []),
        ("", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


TOY = {1: "apple banana", 2: "apple apple cherry", 3: "banana cherry cherry date"}


def toy_index(**params: float) -> KeywordIndex:
    index = KeywordIndex(**params)
    index.add(list(TOY), list(TOY.values()))
    return index


def test_toy_scores_match_the_formula_by_hand() -> None:
    k1, b = 1.2, 0.75
    index = toy_index(k1=k1, b=b)
    # Lengths 2, 3, 4 tokens: average 3. "apple" is in 2 of 3 documents, "date" in 1.
    score = {"n_docs": 3, "avg_length": 3.0, "k1": k1, "b": b}
    apple_1 = bm25(1, 2, 2, **score)  # 0.4700 * 2.2 / 1.9
    apple_2 = bm25(2, 2, 3, **score)  # 0.4700 * 4.4 / 3.2
    date_3 = bm25(1, 1, 4, **score)  # 0.9808 * 2.2 / 2.5
    assert (round(apple_1, 4), round(apple_2, 4), round(date_3, 4)) == (0.5442, 0.6463, 0.8631)

    assert index.search("apple", k=10) == [(2, pytest.approx(apple_2)), (1, pytest.approx(apple_1))]
    # The rare term outweighs a doubled common one.
    assert index.search("apples or dates", k=10) == [
        (3, pytest.approx(date_3)),
        (2, pytest.approx(apple_2)),
        (1, pytest.approx(apple_1)),
    ]
    # A repeated query word counts as often as it is repeated.
    doubled = [(2, pytest.approx(2 * apple_2)), (1, pytest.approx(2 * apple_1))]
    assert index.search("apple apple", k=10) == doubled
    assert index.search("apples or dates", k=1) == [(3, pytest.approx(date_3))]


def test_defaults_and_parameters_change_scores() -> None:
    assert (KeywordIndex().k1, KeywordIndex().b) == (DEFAULT_K1, DEFAULT_B)
    flat = toy_index(k1=1.2, b=0.0)
    # With b = 0, document length does not matter.
    expected = bm25(1, 2, 2, n_docs=3, avg_length=3.0, k1=1.2, b=0.0)
    assert dict(flat.search("apple", k=10))[1] == pytest.approx(expected)


def test_ties_are_broken_by_id_also_at_the_cut() -> None:
    index = KeywordIndex()
    index.add([9, 4, 6, 2], ["red fox", "red fox", "red fox", "blue whale"])
    hits = index.search("fox", k=2)
    assert [key for key, _ in hits] == [4, 6]
    assert hits[0][1] == hits[1][1] > 0


def test_empty_unknown_and_stopword_queries_find_nothing() -> None:
    assert KeywordIndex().search("anything", k=5) == []
    index = toy_index()
    assert index.search("zebra", k=5) == []
    assert index.search("the of and", k=5) == []
    assert index.search("", k=5) == []
    assert index.search("apple", k=0) == []
    index.remove(list(TOY))
    assert index.search("apple", k=5) == []
    assert len(index) == 0


def test_unicode_and_large_ids() -> None:
    index = KeywordIndex()
    big = 2**62 + 1
    index.add(
        [big, -5, 3],
        ["Die Straße in München", "café crème, ﬁle naïve", f"東京 😀 {fullwidth('Fullwidth')}"],
    )
    assert [key for key, _ in index.search("STRASSE straße", k=5)] == [big]
    assert [key for key, _ in index.search("Café FILE", k=5)] == [-5]
    assert [key for key, _ in index.search("東京 fullwidth", k=5)] == [3]
    assert all(type(key) is int and type(score) is float for key, score in index.search("straße", k=5))


def test_add_replaces_an_existing_id_and_checks_its_arguments() -> None:
    index = toy_index()
    index.add([2], ["zebra"])
    assert len(index) == 3
    assert 2 in index and 7 not in index
    assert [key for key, _ in index.search("apple", k=5)] == [1]
    assert [key for key, _ in index.search("zebra", k=5)] == [2]
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        index.add([5, 6], ["x"])
    with pytest.raises(ValueError, match="same id twice"):
        index.add([5, 5], ["x", "y"])
    index.remove([404, 1])  # unknown ids are ignored
    assert len(index) == 2


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def random_docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choices(WORDS[: rng.randint(3, len(WORDS))], k=rng.randint(1, 30))) for _ in range(n)
    ]


QUERIES = ["alpha", "pi omicron", "beta beta gamma", "xi nu mu delta", "zeta theta kappa lambda iota"]


def results(index: KeywordIndex) -> list[list[tuple[int, float]]]:
    return [index.search(query, k=20) for query in QUERIES]


@pytest.mark.parametrize(("n_added", "n_removed"), [(5, 5), (60, 30)])  # tail kept / compacted
def test_incremental_updates_equal_a_fresh_build(n_added: int, n_removed: int) -> None:
    docs = dict(enumerate(random_docs(1, 80 + n_added), start=100))
    index = KeywordIndex()
    index.add(list(docs)[:80], list(docs.values())[:80])
    index.search("alpha", k=1)  # builds the base postings
    index.add(list(docs)[80:], list(docs.values())[80:])
    removed = random.Random(2).sample(list(docs), n_removed)
    index.remove(removed)
    for key in removed:
        del docs[key]
    changed = list(docs)[:3]
    index.add(changed, ["alpha pi pi"] * 3)
    docs.update(dict.fromkeys(changed, "alpha pi pi"))

    fresh = KeywordIndex()
    fresh.add(list(docs), list(docs.values()))
    assert len(index) == len(fresh) == len(docs)
    assert results(index) == results(fresh)
    assert any(results(fresh))


def test_save_load_roundtrip(tmp_path: Path) -> None:
    docs = dict(enumerate(random_docs(3, 50)))
    index = KeywordIndex(k1=0.9, b=0.4)
    index.add(list(docs), list(docs.values()))
    index.remove([0, 1, 2])
    path = tmp_path / "keyword.tmp"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["keyword.tmp"]  # no ".npz" appended

    loaded = KeywordIndex.load(path)
    assert (loaded.k1, loaded.b, len(loaded)) == (0.9, 0.4, 47)
    assert results(loaded) == results(index)
    # A loaded index keeps updating in place.
    for each in (loaded, index):
        each.remove([3, 4])
        each.add([1000, 5], ["alpha omicron", "pi"])
    assert results(loaded) == results(index)


def test_save_load_empty(tmp_path: Path) -> None:
    KeywordIndex().save(tmp_path / "empty")
    loaded = KeywordIndex.load(tmp_path / "empty")
    assert len(loaded) == 0
    assert loaded.search("alpha", k=3) == []
    loaded.add([1], ["alpha"])
    assert [key for key, _ in loaded.search("alpha", k=3)] == [1]


def test_load_rejects_other_formats(tmp_path: Path) -> None:
    with pytest.raises(IndexMissingError, match="rag index"):
        KeywordIndex.load(tmp_path / "missing.npz")

    old = tmp_path / "old.npz"
    with open(old, "wb") as file:
        np.savez(file, format=np.array("rag-bm25 v0"))
    with pytest.raises(IndexMismatchError, match="'rag-bm25 v0', expected 'rag-bm25 v1'"):
        KeywordIndex.load(old)

    for name, content in [("garbage", b"not an index at all"), ("empty", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(IndexMismatchError, match=name):
            KeywordIndex.load(tmp_path / name)

    array = tmp_path / "array.npy"
    np.save(array, np.arange(3))
    with pytest.raises(IndexMismatchError, match="not a keyword index"):
        KeywordIndex.load(array)


def test_load_rejects_a_damaged_index(tmp_path: Path) -> None:
    path = tmp_path / "kw"
    toy_index().save(path)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["rows"] = arrays["rows"] + 10  # rows past the last document
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    with pytest.raises(IndexMismatchError, match="damaged"):
        KeywordIndex.load(path)


def test_search_after_a_removal_that_drops_terms_matches_only_live_documents() -> None:
    # Regression: compaction renumbers terms, and used to do so after the query was mapped.
    index = KeywordIndex()
    index.add([1, 2], ["apples are red", "bananas are yellow"])
    assert [key for key, _ in index.search("apples", 5)] == [1]
    index.remove([1])
    assert index.search("apples", 5) == []
    assert [key for key, _ in index.search("bananas", 5)] == [2]


def test_merged_indexes_score_as_one_fresh_build() -> None:
    """Segments' postings joined (some of their ids dropped) equal an index built from scratch."""
    import random

    rng = random.Random(3)
    words = "red green blue apple apples pear plum sky sea tree stone running runs".split()
    texts = {i: " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for i in range(300)}
    parts = []
    for start in (0, 100, 200):
        index = KeywordIndex()
        index.add(list(range(start, start + 100)), [texts[i] for i in range(start, start + 100)])
        index.remove([start + 1])  # a dead row inside a part
        parts.append(index)
    keep = [i for i in range(100) if i % 3 and i != 1]
    merged = KeywordIndex.merged([(parts[0], keep), (parts[1], None), (parts[2], range(200, 250))])
    fresh = KeywordIndex()
    ids = keep + [i for i in range(100, 200) if i != 101] + [i for i in range(200, 250) if i != 201]
    fresh.add(ids, [texts[i] for i in ids])
    assert len(merged) == len(fresh)
    for query in ("red apple", "sky sea stone", "run", "plum plum pear"):
        got, want = merged.search(query, 30), fresh.search(query, 30)
        assert [k for k, _ in got] == [k for k, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want])
    with pytest.raises(ValueError, match="same id"):
        KeywordIndex.merged([(parts[0], None), (parts[0], None)])

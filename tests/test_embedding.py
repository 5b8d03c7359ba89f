"""The embedder seam: the fake's contract, and the real model (offline) as its counterpart."""

from __future__ import annotations


import numpy as np
import pytest

from pathlib import Path

from rag.config import Settings
from rag.embedding import ProgressEmbedder, SentenceTransformerEmbedder, create_embedder, embedder_for, normalize
from rag.errors import ConfigError
from tests.fakes import FakeEmbedder


def test_normalize_keeps_zero_rows() -> None:
    out = normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_fake_is_deterministic_text_dependent_and_batched() -> None:
    a, b = FakeEmbedder(batch_size=2), FakeEmbedder(batch_size=3)
    texts = ["red apples", "green apples", "fast cars", "red apples", "quantum physics"]
    va, vb = a.embed(texts), b.embed(texts)
    np.testing.assert_allclose(va, vb)
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, rtol=1e-6)
    assert va[0] @ va[1] > va[0] @ va[2]
    np.testing.assert_array_equal(va[0], va[3])


def test_batches_hold_texts_of_like_length_and_rows_keep_input_order() -> None:
    texts = ["a b", "a b c d e f g h", "a", "a b c d e f g", "a b c", "a b c d e f"]
    batched, single = FakeEmbedder(batch_size=2), FakeEmbedder(batch_size=1)
    sizes: list[int] = []
    vectors = batched.embed(texts, on_batch=sizes.append)
    # Longest first, two at a time: the two longest share a batch, the two shortest another.
    assert batched.embedded == sorted(texts, key=len, reverse=True)
    assert sizes == [2, 2, 2]
    np.testing.assert_array_equal(vectors, single.embed(texts))
    assert single.embedded == sorted(texts, key=len, reverse=True)


def test_progress_counts_passages_embedded_not_queries() -> None:
    asked: list[str] = []

    class QueryAware(FakeEmbedder):
        def embed_query(self, text: str) -> np.ndarray:
            asked.append(text)
            return super().embed_query(text)

    inner = QueryAware(batch_size=2)
    progress = ProgressEmbedder(inner)
    batches: list[int] = []
    vectors = progress.embed(["a b", "c", "d e f"], on_batch=batches.append)
    assert progress.embedded == 3 and batches == [2, 1]
    assert np.allclose(vectors, FakeEmbedder().embed(["a b", "c", "d e f"]))
    progress.embed_query("how often?")  # the inner embedder's own query path, not counted
    assert asked == ["how often?"] and progress.embedded == 3
    assert (progress.model_id, progress.dimension, progress.count_tokens("a b")) == ("fake-bow", 256, 4)


def test_query_backend_setting_decides_the_query_path(tmp_path: Path) -> None:
    torch_only = embedder_for(Settings(data_dir=tmp_path, query_backend="torch"))
    assert isinstance(torch_only, SentenceTransformerEmbedder)
    assert torch_only.query_encoder() is None  # decided without loading anything
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="RAG_QUERY_BACKEND='gpu'"):
        Settings(query_backend="gpu")


def test_unknown_model_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="RAG_EMBEDDING_MODEL='no-such-model'"):
        create_embedder("no-such-model")


@pytest.fixture(scope="module")
def real() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.mark.slow
def test_real_model_loads_offline_with_its_own_window(real: SentenceTransformerEmbedder) -> None:
    vectors = real.embed(["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert real.dimension == 384 and real.max_tokens == 256
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


@pytest.mark.slow
def test_real_token_count_matches_the_models_tokenizer(real: SentenceTransformerEmbedder) -> None:
    text = "Tokenization of ünïcode and numbers like 3.14159 is counted with special tokens."
    ids = real.model.tokenizer(text)["input_ids"]
    assert real.count_tokens(text) == len(ids)
    assert real.count_tokens_many([text, "hi"]) == [len(ids), 3]


@pytest.mark.slow
def test_real_model_rows_follow_the_input_order_whatever_the_batching(real: SentenceTransformerEmbedder) -> None:
    texts = ["Short.", "A much longer sentence about lighthouses and their keepers.", "Mid-length text here."]
    together = real.embed(texts)
    alone = np.stack([real.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.slow
def test_real_model_really_truncates_past_its_window(real: SentenceTransformerEmbedder) -> None:
    # Why chunks must stay inside the window: words past 256 word-pieces change nothing.
    head = " ".join(["alpha"] * 300)
    a, b = real.embed([head + " completely different ending about volcanoes", head])
    assert float(a @ b) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_real_queries_run_on_the_onnx_export_with_torchs_vectors(
    real: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    fast = SentenceTransformerEmbedder(cache_dir=tmp_path)
    assert fast.query_encoder() is not None
    (export,) = tmp_path.glob("query-*.onnx")
    texts = [
        "What does the warranty cover?",
        "Qu'est-ce que la garantie couvre ? Ça dépend — naïve façade, 東京",
        " ".join(["lighthouse keeper"] * 200),  # past the 256 word-piece window: truncated alike
        "a",
    ]
    for text in texts:
        assert float(fast.embed_query(text) @ real.embed_query(text)) > 0.9999
    assert real.query_encoder() is None  # no cache directory: torch answers

    again = SentenceTransformerEmbedder(cache_dir=tmp_path)
    before = export.stat().st_mtime_ns
    assert again.query_encoder() is not None
    assert export.stat().st_mtime_ns == before  # reused, not exported again


@pytest.mark.slow
def test_a_broken_onnx_export_falls_back_to_torch_and_is_rebuilt(
    real: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    (tmp_path / "query-0123456789abcdef.onnx").write_bytes(b"an export of other model files")
    SentenceTransformerEmbedder(cache_dir=tmp_path).query_encoder()
    (export,) = tmp_path.glob("query-*.onnx")  # the stale one is gone
    export.write_bytes(b"not an onnx model")
    broken = SentenceTransformerEmbedder(cache_dir=tmp_path)
    assert broken.query_encoder() is None
    text = "How are passages ranked?"
    assert float(broken.embed_query(text) @ real.embed_query(text)) > 0.9999
    assert not export.exists()  # removed, so the next start exports it again
    assert SentenceTransformerEmbedder(cache_dir=tmp_path).query_encoder() is not None
    assert export.stat().st_size > 1_000_000

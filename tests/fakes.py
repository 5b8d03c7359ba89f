"""Fakes for fast unit tests; each has a real counterpart test (see test_*_real.py / slow tests)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence

import numpy as np

from rag.embedding import Embedder

WORD = re.compile(r"\w+", re.UNICODE)


class FakeEmbedder(Embedder):
    """Hashed bag of words, normalised: texts sharing words get similar vectors.

    Tokens are words plus two special tokens, like a BERT tokenizer's [CLS] and [SEP].
    ``embedded`` counts every text embedded, so tests can show what was (re)embedded.
    """

    model_id = "fake-bow"
    dimension = 256
    max_tokens = 256

    def __init__(self, *, batch_size: int = 8, model_id: str = "fake-bow") -> None:
        super().__init__(batch_size=batch_size)
        self.model_id = model_id
        self.embedded: list[str] = []

    def count_tokens(self, text: str) -> int:
        return len(WORD.findall(text)) + 2

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded.extend(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in WORD.findall(text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dimension] += 1.0 if (h >> 32) & 1 else -1.0
            if not out[row].any():
                out[row, 0] = 1.0
        return out


class SlowFakeEmbedder(FakeEmbedder):
    """The fake, slowed down per batch: gives a test time to kill an indexer mid-run."""

    def __init__(self, *, delay: float = 0.05, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.delay = delay

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        time.sleep(self.delay)
        return super().embed_batch(texts)

"""Embedding on a Ray cluster: the indexer's document batches go to a pool of embedder actors.

``RAG_RAY_ADDRESS`` (``pip install '.[ray]'``) turns it on for indexing: ``auto`` joins the
cluster this machine belongs to, ``ray://head:10001`` a remote one through Ray Client, and
``local`` starts a cluster inside this process (for trying it out). Each actor loads the same
model (it must be installed on every node: ``pip install '.[ray]'`` there too) and takes whole
batches, cut exactly as ``Embedder.embed`` cuts them (longest texts first, ``RAG_EMBED_BATCH_SIZE``
a batch), so the vectors are the local ones up to float rounding, in input order.

Only documents go to the cluster. Counting tokens (for chunking) and embedding questions stay
on this machine: they are small and latency-bound. On one 2-core machine the pool is slower
than in-process encoding (each actor gets one core, plus Ray's overhead); it pays with several
nodes (see README, "Running for a team / at scale").
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rag.embedding import Embedder, SentenceTransformerEmbedder, normalize
from rag.errors import ConfigError, EmbeddingError

if TYPE_CHECKING:
    from rag.config import Settings

# A local cluster's shared-memory object store: batches of text and vectors are small, and Ray's
# default (30 % of memory) would reserve gigabytes.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def _ray() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "RAG_RAY_ADDRESS is set but Ray is not installed: pip install '.[ray]' (or unset RAG_RAY_ADDRESS)"
        ) from exc
    return ray


def connect(address: str) -> Any:
    """Join (or, for ``local``, start) the cluster at ``address``; returns the ``ray`` module."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    try:
        if address == "local":
            ray.init(
                num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False, log_to_driver=False, configure_logging=False,
            )
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # ConnectionError, RuntimeError, ...: Ray raises many kinds
        raise ConfigError(f"RAG_RAY_ADDRESS={address!r}: could not join the Ray cluster ({exc})") from exc
    return ray


_POOLS: dict[tuple[int, str], RayEmbedder] = {}


class _EmbedderActor:
    """Runs on a cluster node: one model, loaded once, embedding whole batches."""

    def __init__(self, factory: Callable[[], Embedder]) -> None:
        self.embedder = factory()

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        return normalize(self.embedder.embed_batch(texts))


class RayEmbedder(Embedder):
    """``local``'s model on a pool of Ray actors for ``embed``; everything else stays local.

    ``factory`` builds the actors' embedder (it is pickled to the nodes); by default the same
    sentence-transformers model as ``local``.
    """

    def __init__(
        self,
        local: Embedder,
        *,
        address: str,
        actors: int | None = None,
        factory: Callable[[], Embedder] | None = None,
    ) -> None:
        super().__init__(batch_size=local.batch_size)
        self.local = local
        self.model_id, self.dimension, self.max_tokens = local.model_id, local.dimension, local.max_tokens
        if factory is None:
            if not isinstance(local, SentenceTransformerEmbedder):
                raise ConfigError(f"RAG_RAY_ADDRESS: no recipe to build {type(local).__name__} on the cluster")
            factory = functools.partial(SentenceTransformerEmbedder, local.model_id, batch_size=local.batch_size)
        self.ray = connect(address)
        remote = self.ray.remote(num_cpus=1)(_EmbedderActor)
        count = actors or max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.actors = [remote.remote(factory) for _ in range(count)]

    @classmethod
    def connect(cls, embedder: Embedder, settings: Settings) -> RayEmbedder:
        """The pool for ``embedder`` at ``RAG_RAY_ADDRESS``; made once per process and reused
        by every later indexing run (the actors keep their loaded models)."""
        if isinstance(embedder, RayEmbedder):
            return embedder
        key = (id(embedder), settings.ray_address)
        pool = _POOLS.get(key)
        if pool is None or pool.local is not embedder or not pool.actors:
            pool = _POOLS[key] = cls(embedder, address=settings.ray_address)
        return pool

    def count_tokens(self, text: str) -> int:
        return self.local.count_tokens(text)

    def embed_query(self, text: str) -> np.ndarray:
        return self.local.embed_query(text)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed(texts)

    def embed(self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """As ``Embedder.embed`` (same batches, same order), each batch on some actor."""
        from ray.util import ActorPool

        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        pool = ActorPool(self.actors)
        try:
            results = pool.map(lambda actor, rows: actor.embed_batch.remote([texts[i] for i in rows]), batches)
            for rows, vectors in zip(batches, results, strict=True):
                out[rows] = vectors
                if on_batch is not None:
                    on_batch(len(rows))
        except self.ray.exceptions.RayError as exc:
            raise EmbeddingError(f"embedding on the Ray cluster failed: {exc}") from exc
        return out

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

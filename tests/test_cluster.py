"""Embedding on a real local Ray cluster (2 CPUs, started by the tests): the same vectors and
the same index as embedding in this process. Slow: Ray starts in seconds, actors load models."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import pytest

from rag.config import Settings
from rag.index import IndexStore
from rag.indexing import sync_index
from rag.retrieval import Retriever
from tests.fakes import FakeEmbedder

pytestmark = pytest.mark.slow

TEXTS = [f"Note {i}: " + " ".join(f"word{(i * j) % 17}" for j in range(i % 9 + 1)) for i in range(40)]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray", reason="Ray not installed: pip install '.[ray]'")
    ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_batches_come_back_in_order_and_equal_to_local(ray_cluster: object) -> None:
    from rag.cluster import RayEmbedder

    local = FakeEmbedder(batch_size=4)
    remote = RayEmbedder(local, address="local", factory=functools.partial(FakeEmbedder, batch_size=4))
    assert len(remote.actors) == 2
    done: list[int] = []
    vectors = remote.embed(TEXTS, on_batch=done.append)
    np.testing.assert_array_equal(vectors, FakeEmbedder(batch_size=4).embed(TEXTS))
    assert sum(done) == len(TEXTS) and local.embedded == []  # nothing embedded in this process
    remote.close()


def test_the_real_model_on_ray_builds_the_same_index(ray_cluster: object, settings: Settings) -> None:
    from rag.embedding import embedder_for

    for i in range(30):
        topic = ["gardening", "sailing", "baking", "astronomy", "chess"][i % 5]
        (settings.corpus_dir / f"n{i:02d}.md").write_text(
            f"# {topic.title()} note {i}\n\nA short note number {i} about {topic} and item{i}.\n", encoding="utf-8"
        )
    local_settings = settings.replace(data_dir=settings.data_dir.parent / "local")
    embedder = embedder_for(local_settings)
    sync_index(local_settings, embedder)
    report = sync_index(settings.replace(ray_address="local"), embedder)
    assert report.chunks_embedded == 30
    here, there = IndexStore(local_settings.index_dir).load(), IndexStore(settings.index_dir).load()
    assert {s: r.chunk_ids for s, r in here.files.items()} == {s: r.chunk_ids for s, r in there.files.items()}
    for key in here.chunks:
        np.testing.assert_allclose(here.vector(key), there.vector(key), atol=1e-5)
    for query in ("how to bake bread", "stars and planets", "opening moves"):
        a = [h.chunk.id for h in Retriever(here, embedder).search(query, k=5)]
        b = [h.chunk.id for h in Retriever(there, embedder).search(query, k=5)]
        assert a == b

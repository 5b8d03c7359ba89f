"""The store seam: where the index lives, behind one interface for the indexer and the retriever.

Two implementations:

- ``IndexStore`` (``rag/index.py``, the default, ``RAG_VECTOR_STORE=embedded``): FAISS vectors and
  our BM25 in files under the data directory, loaded whole into memory. Fastest on one machine;
  one machine only.
- ``MilvusStore`` (``rag/milvus.py``, ``RAG_VECTOR_STORE=milvus``): the same rows in a Milvus
  collection, dense and BM25 search run by the server, so that several app replicas share one
  index. Needs ``pip install '.[milvus]'``.

Both are written by the same incremental indexer (``rag/indexing.py``) through the same calls,
and both hand readers a *snapshot*: one committed generation that never changes under the
reader, whatever a writer does meanwhile.

A snapshot (``Snapshot`` or ``MilvusSnapshot``) offers::

    .params .generation .updated_at .files (source -> FileRecord) .chunks (key -> Chunk) len()
    chunks_of(source)  vector(key)  fetch(keys) -> {key: (Chunk, vector)}
    dense_search(vector, n) -> [(key, score)]   keyword_search(query, n) -> [(key, score)]

and a store::

    current_generation()  read_manifest()  load(expected=, previous=)  size_on_disk()
    lock(wait=)  collect_garbage()  begin(old, params) -> update  commit(update, extra=)
    location (for messages)

An *update* (what ``begin`` returns, the indexer's working copy) offers ``files``,
``put_file(record, chunks, vectors, texts)``, ``drop_file(source)``, ``touch_file(record)``,
``update_ann(threshold)``, ``len()`` and ``vectors_for_texts(texts)`` (vectors the store already
holds for these embedded texts, so that only new text is embedded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rag.errors import ConfigError

if TYPE_CHECKING:
    from rag.config import Settings
    from rag.index import IndexStore
    from rag.milvus import MilvusStore

STORES = ("embedded", "milvus")


def open_store(settings: Settings) -> IndexStore | MilvusStore:
    """The store ``settings.vector_store`` names, opened (Milvus is connected on first use).

    >>> from rag.config import Settings
    >>> type(open_store(Settings())).__name__
    'IndexStore'
    """
    kind = getattr(settings, "vector_store", "embedded")
    if kind == "embedded":
        from rag.index import IndexStore

        return IndexStore(settings.index_dir)
    if kind == "milvus":
        from rag.milvus import MilvusStore

        return MilvusStore.from_settings(settings)
    raise ConfigError(f"RAG_VECTOR_STORE={kind!r} is not one of {', '.join(STORES)}")

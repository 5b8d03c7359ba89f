"""Bring the index in line with the corpus folder, incrementally.

One run: scan the folder, compare each file with the manifest (size and mtime first, the
content hash when those differ), read and chunk only new or changed files, embed only chunk
texts the index has not embedded before, drop the chunks of changed and deleted files, and
commit. A change of embedding model or chunking settings rebuilds everything, and says why.

Every file's bytes are read once: the same bytes are hashed and parsed, so a file that changes
while we index it is recorded as the version we read, and the next run sees the difference.
A file that fails to load is skipped with its reason; if an earlier version was indexed, that
version is kept (bad input never loses data) and the report says so.

The work is committed in checkpoints (``RAG_CHECKPOINT_SECONDS``), so killing the indexer loses at
most that much embedding, and the next run carries on from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from rag.chunking import embedding_text, split_documents
from rag.config import Settings
from rag.embedding import Embedder
from rag.errors import IndexMismatchError, IndexMissingError, LoadError
from rag.index import FileRecord, IndexParams, text_hash
from rag.loaders import CorpusFile, Scan, load_bytes, scan_corpus
from rag.store import open_store
from rag.types import Chunk, Document, IndexReport, SkippedFile

if TYPE_CHECKING:
    from rag.index import IndexStore, Snapshot
    from rag.milvus import MilvusSnapshot, MilvusStore

# v2: a chunk inside a table keeps its header row (Chunk.table_header); HTML tables as Markdown
CHUNKER_VERSION = "structure-v2"


def index_params(settings: Settings, embedder: Embedder) -> IndexParams:
    return IndexParams(
        embedding_model=embedder.model_id,
        dimension=embedder.dimension,
        chunk_tokens=settings.chunk_tokens,
        chunk_overlap=settings.chunk_overlap,
        window=embedder.max_tokens,
        chunker=CHUNKER_VERSION,
    )


def chunk_documents(documents: list[Document], settings: Settings, embedder: Embedder) -> list[Chunk]:
    """Chunk as the index does: the settings' sizes, measured with the embedder's own tokenizer
    and kept inside its window. The evaluation and the benchmarks call this too."""
    return split_documents(
        documents,
        max_tokens=settings.chunk_tokens,
        overlap_tokens=settings.chunk_overlap,
        count_tokens=embedder.count_tokens,
        window=embedder.max_tokens or None,
    )


class VectorLookup(Protocol):
    """What a store's update offers the indexer: vectors it already holds, by text hash."""

    def prefetch(self, texts: Iterable[str]) -> None: ...

    def has(self, h: bytes) -> bool: ...

    def get(self, h: bytes) -> np.ndarray | None: ...


@dataclass(frozen=True)
class _Pending:
    """A file read and chunked, waiting for its vectors."""

    file: CorpusFile
    sha256: str
    chunks: tuple[Chunk, ...]
    texts: tuple[str, ...]
    is_new: bool


def _read(file: CorpusFile) -> bytes:
    try:
        with open(file.path, "rb") as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise LoadError(file.source, "file disappeared while indexing") from exc
    except PermissionError as exc:
        raise LoadError(file.source, "permission denied") from exc
    except OSError as exc:
        raise LoadError(file.source, f"could not be read: {exc.strerror or exc}") from exc


class _VectorCache:
    """Vectors already at hand for a text: embedded earlier in this run, or held by the store
    (``lookup``, by the hash of the embedded text)."""

    def __init__(self, lookup: VectorLookup) -> None:
        self._lookup = lookup
        self._fresh: dict[bytes, np.ndarray] = {}

    def prefetch(self, texts: Iterable[str]) -> None:
        self._lookup.prefetch(texts)

    def get(self, text: str) -> np.ndarray | None:
        h = text_hash(text)
        if h in self._fresh:
            return self._fresh[h]
        return self._lookup.get(h)

    def has(self, text: str) -> bool:
        h = text_hash(text)
        return h in self._fresh or self._lookup.has(h)

    def put(self, text: str, vector: np.ndarray) -> None:
        self._fresh[text_hash(text)] = vector


def sync_index(
    settings: Settings,
    embedder: Embedder,
    *,
    full: bool = False,
    checkpoint_seconds: float | None = None,
    show_progress: bool | None = None,
    wait_for_lock: bool = False,
) -> IndexReport:
    """Update the index of ``settings.corpus_dir``; returns what was done."""
    started = time.monotonic()
    if checkpoint_seconds is None:
        checkpoint_seconds = settings.checkpoint_seconds
    store = open_store(settings)
    params = index_params(settings, embedder)
    if settings.ray_address:
        from rag.cluster import RayEmbedder

        embedder = RayEmbedder.connect(embedder, settings)
    with store.lock(wait=wait_for_lock):
        store.collect_garbage()
        scan = scan_corpus(settings.corpus_dir, max_bytes=settings.max_file_bytes)
        if not full:
            quiet = _nothing_changed(store, params, scan, started)
            if quiet is not None:
                return quiet
        rebuild_reason: str | None = "full rebuild requested" if full else None
        old: Snapshot | MilvusSnapshot | None = None
        if not full:
            try:
                old = store.load()
            except IndexMissingError:
                old = None
            except IndexMismatchError as exc:
                rebuild_reason = str(exc)
            if old is not None:
                difference = params.difference(old.params)
                if difference:
                    rebuild_reason = f"the index was built with other settings ({difference})"
                    old = None

        work = store.begin(old, params)
        lookup: VectorLookup = work.vector_lookup(embedding_text)
        if old is None and store.kind != "embedded":
            lookup = _with_embedded_index(lookup, settings, params)
        cache = _VectorCache(lookup)

        skipped: list[SkippedFile] = list(scan.skipped)
        present = {f.source for f in scan.files}
        unchanged: list[str] = []
        touched: list[str] = []
        added: list[str] = []
        updated: list[str] = []
        notes: list[str] = []

        # Skipped files that were indexed before keep their old chunks (never lose data);
        # files that are gone from the folder are removed.
        # A skipped folder (unreadable, a loop) is reported with a trailing "/": its files stay.
        # Removal waits until after embedding, so a renamed file reuses its old vectors.
        kept, removed = _kept_and_removed(work.files, present, skipped)
        notes.extend(f"{source}: kept the previously indexed version" for source in kept)

        pending: list[_Pending] = []
        to_read = []
        for file in scan.files:
            record = work.files.get(file.source)
            if record is not None and record.size == file.size and record.mtime_ns == file.mtime_ns:
                unchanged.append(file.source)
            else:
                to_read.append(file)

        progress = _progress(show_progress)
        for file in progress(to_read, desc="reading", unit="file"):
            try:
                data = _read(file)
                if len(data) > settings.max_file_bytes:
                    raise LoadError(file.source, "grew past the size limit while indexing")
                sha = hashlib.sha256(data).hexdigest()
                record = work.files.get(file.source)
                if record is not None and record.sha256 == sha:
                    # Touched, not changed: remember the new stat, keep the chunks.
                    work.touch_file(FileRecord(file.source, sha, file.size, file.mtime_ns, record.chunk_ids))
                    unchanged.append(file.source)
                    touched.append(file.source)
                    continue
                documents = load_bytes(file.source, data)
                chunks = chunk_documents(documents, settings, embedder)
            except LoadError as exc:
                skipped.append(SkippedFile(file.source, exc.reason))
                if file.source in work.files:
                    notes.append(f"{file.source}: kept the previously indexed version")
                continue
            if not chunks:
                skipped.append(SkippedFile(file.source, "no text to index"))
                continue
            pending.append(
                _Pending(
                    file=file,
                    sha256=sha,
                    chunks=tuple(chunks),
                    texts=tuple(embedding_text(c) for c in chunks),
                    is_new=file.source not in work.files,
                )
            )

        cache.prefetch(text for item in pending for text in item.texts)
        total_new = _count_uncached(pending, cache)
        embedded = 0
        last_checkpoint = time.monotonic()
        bar = progress(total=total_new, desc="embedding", unit="chunk")
        try:
            for group, missing in _groups(pending, cache, settings.embed_group):
                # One call for the whole group: the embedder batches texts of like length.
                texts = list(missing.values())
                if texts:
                    for text, vector in zip(texts, embedder.embed(texts, on_batch=bar.update), strict=True):
                        cache.put(text, vector)
                    embedded += len(texts)
                for item in group:
                    vectors = np.stack([cache.get(text) for text in item.texts]).astype(np.float32, copy=False)
                    work.put_file(
                        FileRecord(
                            item.file.source,
                            item.sha256,
                            item.file.size,
                            item.file.mtime_ns,
                            tuple(c.id for c in item.chunks),
                        ),
                        item.chunks,
                        vectors,
                        item.texts,
                    )
                    (added if item.is_new else updated).append(item.file.source)
                if time.monotonic() - last_checkpoint > checkpoint_seconds:
                    store.commit(work, extra=_extra(skipped))
                    last_checkpoint = time.monotonic()
        finally:
            bar.close()
        for source in removed:
            work.drop_file(source)

        changed = bool(added or updated or removed or rebuild_reason or old is None)
        if changed or touched or store.current_generation() is None:
            work.update_ann(settings.ann_threshold)
            store.commit(work, extra=_extra(skipped))

    return IndexReport(
        added=tuple(sorted(added)),
        updated=tuple(sorted(updated)),
        removed=tuple(removed),
        unchanged=tuple(sorted(set(unchanged))),
        skipped=tuple(sorted(skipped, key=lambda s: s.source)),
        ignored=scan.ignored,
        chunks_embedded=embedded,
        chunks_total=len(work),
        seconds=time.monotonic() - started,
        rebuild_reason=rebuild_reason,
        notes=tuple(notes),
    )


def _kept_and_removed(
    indexed: Iterable[str], present: set[str], skipped: Iterable[SkippedFile]
) -> tuple[list[str], list[str]]:
    """Indexed files gone from the scan: those skipped this time (or under a skipped folder,
    reported with a trailing "/") are kept; the others were removed."""
    skipped = list(skipped)
    skipped_files = {s.source for s in skipped if not s.source.endswith("/")}
    skipped_dirs = tuple(s.source for s in skipped if s.source.endswith("/"))
    gone = [s for s in indexed if s not in present]
    kept = sorted(s for s in gone if s in skipped_files or s.startswith(skipped_dirs))
    removed = sorted(s for s in gone if s not in kept)
    return kept, removed


def _nothing_changed(
    store: IndexStore | MilvusStore, params: IndexParams, scan: Scan, started: float
) -> IndexReport | None:
    """The report of a run with nothing to do, decided from the stored file records alone; None
    when anything may have changed (the full path then decides). Loading every segment to find
    that nothing changed made each start of a 100k-chunk index wait 7.9 s."""
    try:
        manifest = store.read_manifest()
        if manifest is None or "files" not in manifest:
            return None
        if params.difference(IndexParams(**manifest["params"])) is not None:
            return None
    except (IndexMismatchError, KeyError, TypeError):
        return None
    files = manifest["files"]
    for file in scan.files:
        record = files.get(file.source)
        if record is None or record["size"] != file.size or record["mtime_ns"] != file.mtime_ns:
            return None
    kept, removed = _kept_and_removed(files, {f.source for f in scan.files}, scan.skipped)
    if removed:
        return None
    return IndexReport(
        added=(),
        updated=(),
        removed=(),
        unchanged=tuple(sorted(f.source for f in scan.files)),
        skipped=tuple(sorted(scan.skipped, key=lambda s: s.source)),
        ignored=scan.ignored,
        chunks_embedded=0,
        chunks_total=int(manifest["chunk_count"]),
        seconds=time.monotonic() - started,
        rebuild_reason=None,
        notes=tuple(f"{source}: kept the previously indexed version" for source in kept),
    )


class _Chain:
    """Vectors from the first lookup that has them."""

    def __init__(self, *lookups: VectorLookup) -> None:
        self.lookups = lookups

    def prefetch(self, texts: Iterable[str]) -> None:
        texts = list(texts)
        for lookup in self.lookups:
            lookup.prefetch(texts)

    def has(self, h: bytes) -> bool:
        return any(lookup.has(h) for lookup in self.lookups)

    def get(self, h: bytes) -> np.ndarray | None:
        for lookup in self.lookups:
            vector = lookup.get(h)
            if vector is not None:
                return vector
        return None


def _with_embedded_index(lookup: VectorLookup, settings: Settings, params: IndexParams) -> VectorLookup:
    """A first build in another store takes the vectors of the embedded index in the data
    directory, when it was built with the same model and chunking: moving to Milvus does not
    embed the corpus again."""
    from rag.errors import IndexError_
    from rag.index import IndexStore

    try:
        local = IndexStore(settings.index_dir).load(expected=params)
    except IndexError_:
        return lookup
    return _Chain(lookup, local.vector_lookup(embedding_text))


def _extra(skipped: list[SkippedFile]) -> dict:
    return {"skipped": [{"source": s.source, "reason": s.reason} for s in skipped]}


def _groups(
    pending: list[_Pending], cache: _VectorCache, size: int
) -> Iterator[tuple[list[_Pending], dict[bytes, str]]]:
    """Consecutive files, gathered until they hold at least ``size`` texts to embed, with those
    texts (each distinct text once, by hash).

    One ``embed`` call per group lets the embedder batch texts of like length from many files
    (a file's own few chunks make short, ragged batches); a group is also the unit of a
    checkpoint, so a kill loses at most one group beyond ``RAG_CHECKPOINT_SECONDS``
    (``RAG_EMBED_GROUP``, 512 texts: a few seconds of embedding on a laptop CPU). The cache is
    asked lazily, so a group never re-embeds what the groups before it embedded.
    """
    group: list[_Pending] = []
    missing: dict[bytes, str] = {}
    for item in pending:
        group.append(item)
        for text in item.texts:
            if not cache.has(text):
                missing.setdefault(text_hash(text), text)
        if len(missing) >= size:
            yield group, missing
            group, missing = [], {}
    if group:
        yield group, missing


def _count_uncached(pending: list[_Pending], cache: _VectorCache) -> int:
    seen: set[bytes] = set()
    count = 0
    for item in pending:
        for text in item.texts:
            h = text_hash(text)
            if h not in seen and not cache.has(text):
                count += 1
            seen.add(h)
    return count


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool | None) -> Callable:
    """tqdm when on a terminal (or asked for), else a silent stand-in."""
    enabled = sys.stderr.isatty() if show is None else show

    def make(iterable=None, **kwargs):  # type: ignore[no-untyped-def]
        if not enabled:
            return iterable if iterable is not None else _NoBar()
        return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)

    return make

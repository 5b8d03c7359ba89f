"""The index on disk: FAISS vectors + BM25 postings + chunk texts + a manifest, versioned.

Layout under the index directory::

    CURRENT            name of the live generation, replaced atomically (write temp, fsync, rename)
    gen-000042/        one complete index: manifest.json, vectors.faiss, keyword.npz, chunks.jsonl
                       (and ann.faiss past the approximate-search threshold)
    lock               held (flock) by the one process allowed to write

A writer builds a whole new generation in a temporary directory, renames it into place and
only then points ``CURRENT`` at it, so a reader (or a writer killed at any moment) always sees
the previous complete index or the new complete one. Rewriting every file per update costs
O(index size) of disk writes, which stays small next to embedding; it buys readers a
consistent snapshot without any coordination. The last two generations are kept, so a reader
that has just read ``CURRENT`` can still open the one it names.

Vectors are kept in an ``IndexIDMap2`` over exact inner-product search (unit vectors: cosine),
keyed by a 60-bit integer taken from each chunk's id, so the chunks of one file can be removed
without touching the rest. Past ``RAG_HNSW_THRESHOLD``-style size (``ann_threshold``) an inverted-file
index (IVF, ~sqrt(n) lists) is kept beside it to answer searches approximately: unlike HNSW it
supports removing ids, so incremental updates never force a rebuild. The exact index stays the
source of truth (vector lookups, similarity scores, re-training); ``bench/`` measures the IVF
recall against it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from rag.errors import IndexLockedError, IndexMismatchError, IndexMissingError
from rag.keyword import KeywordIndex
from rag.types import Chunk

FORMAT = "rag-index v2"
CURRENT = "CURRENT"
KEEP_GENERATIONS = 2
DEFAULT_NPROBE = 16


def chunk_key(chunk_id: str) -> int:
    """The FAISS id of a chunk: its hex id's first 60 bits, as a non-negative int64.

    >>> chunk_key("00000000000000ff" + "0" * 16)
    15
    """
    return int(chunk_id[:15], 16)


@dataclass(frozen=True)
class IndexParams:
    """What the vectors and chunks depend on; a difference forces a full rebuild."""

    embedding_model: str
    dimension: int
    chunk_tokens: int
    chunk_overlap: int
    window: int
    chunker: str

    def difference(self, other: IndexParams) -> str | None:
        """Why ``other`` (on disk) cannot be updated incrementally into ``self``, or None."""
        reasons = []
        for name, value in asdict(self).items():
            old = getattr(other, name)
            if old != value:
                reasons.append(f"{name} changed from {old!r} to {value!r}")
        return "; ".join(reasons) or None


@dataclass(frozen=True)
class FileRecord:
    """One indexed file: what it was when indexed, and its chunks (in document order)."""

    source: str
    sha256: str
    size: int
    mtime_ns: int
    chunk_ids: tuple[str, ...]


@dataclass
class Snapshot:
    """A whole index in memory: loaded for search, or the working copy of an update."""

    params: IndexParams
    files: dict[str, FileRecord] = field(default_factory=dict)
    chunks: dict[int, Chunk] = field(default_factory=dict)
    vectors: faiss.IndexIDMap2 | None = None
    keyword: KeywordIndex = field(default_factory=KeywordIndex)
    generation: str | None = None
    updated_at: float = 0.0
    ann: faiss.IndexIVFFlat | None = None
    ann_trained_on: int = 0
    # What the store holds of this snapshot (set by load and commit; see IndexStore): its
    # segments, the segment each record (or deletion) and each chunk was last written to, and
    # what changed since, which is all the next commit writes.
    segments: list[dict] | None = None
    record_home: dict[str, str] = field(default_factory=dict)
    key_home: dict[int, str] = field(default_factory=dict)
    dirty: dict[str, FileRecord | None] = field(default_factory=dict)
    new_texts: dict[int, str] = field(default_factory=dict)
    ann_file: str | None = None

    def __post_init__(self) -> None:
        if self.vectors is None:
            self.vectors = faiss.IndexIDMap2(faiss.IndexFlatIP(self.params.dimension))

    def __len__(self) -> int:
        return len(self.chunks)

    def chunks_of(self, source: str) -> list[Chunk]:
        record = self.files.get(source)
        if record is None:
            return []
        return [self.chunks[chunk_key(cid)] for cid in record.chunk_ids]

    def vector(self, key: int) -> np.ndarray:
        assert self.vectors is not None
        return np.asarray(self.vectors.reconstruct(int(key)), dtype=np.float32)

    def drop_file(self, source: str) -> None:
        record = self.files.pop(source, None)
        if record is None:
            return
        self.dirty[source] = None
        keys = [chunk_key(cid) for cid in record.chunk_ids]
        for key in keys:
            self.chunks.pop(key, None)
            self.new_texts.pop(key, None)
        assert self.vectors is not None
        self.vectors.remove_ids(np.asarray(keys, dtype=np.int64))
        if self.ann is not None:
            self.ann.remove_ids(np.asarray(keys, dtype=np.int64))
        self.keyword.remove(keys)

    def put_file(
        self, record: FileRecord, chunks: Sequence[Chunk], vectors: np.ndarray, texts: Sequence[str]
    ) -> None:
        """Replace whatever was indexed for ``record.source`` with these chunks."""
        self.drop_file(record.source)
        keys = np.asarray([chunk_key(c.id) for c in chunks], dtype=np.int64)
        if len(set(keys.tolist())) != len(keys) or any(int(k) in self.chunks for k in keys):
            # 60-bit keys from 128-bit content hashes: a clash is astronomically unlikely,
            # but a silent overwrite would mis-cite, so refuse loudly.
            raise IndexMismatchError(f"chunk id collision while indexing {record.source}: rebuild with --full")
        for key, chunk in zip(keys.tolist(), chunks, strict=True):
            self.chunks[key] = chunk
        if len(chunks):
            assert self.vectors is not None
            self.vectors.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)
            if self.ann is not None:
                self.ann.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)
            self.keyword.add(keys.tolist(), list(texts))
            self.new_texts.update(zip(keys.tolist(), texts, strict=True))
        self.files[record.source] = record
        self.dirty[record.source] = record

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every vector and its key, in storage order."""
        assert self.vectors is not None
        flat = faiss.downcast_index(self.vectors.index)
        return flat.reconstruct_n(0, flat.ntotal), faiss.vector_to_array(self.vectors.id_map)

    def touch_file(self, record: FileRecord) -> None:
        """Remember a new stat for a file whose content (and so chunks) did not change."""
        self.files[record.source] = record
        self.dirty[record.source] = record

    def vector_lookup(self, text_of: Callable[[Chunk], str]) -> SnapshotVectors:
        """Vectors this snapshot already holds, found by the text they embed."""
        return SnapshotVectors(self, text_of)

    # -- searching (the same calls as MilvusSnapshot's) ----------------------------------------

    def dense_search(self, vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The ``n`` nearest chunks by inner product, best first (approximate past the threshold)."""
        index = self.ann if self.ann is not None else self.vectors
        assert index is not None
        n = min(n, index.ntotal)
        if n == 0:
            return []
        scores, keys = search_one(index, vector, n)
        return [(int(key), float(s)) for key, s in zip(keys[0], scores[0], strict=True) if key != -1]

    def keyword_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """The ``n`` best chunks by BM25, best first."""
        return self.keyword.search(query, n)

    def fetch(self, keys: Sequence[int]) -> dict[int, tuple[Chunk, np.ndarray]]:
        """Each key's chunk and vector."""
        return {key: (self.chunks[key], self.vector(key)) for key in keys}

    def update_ann(self, threshold: int) -> None:
        """Keep an approximate index when the exact one is past ``threshold`` vectors.

        Trained on the current vectors with ~sqrt(n) lists; trained again when the index has
        grown fourfold since, so the lists stay balanced. Below the threshold it is dropped.
        """
        n = len(self.chunks)
        if n < max(threshold, 1):
            self.ann, self.ann_trained_on, self.ann_file = None, 0, None
            return
        if self.ann is not None and n <= 4 * self.ann_trained_on:
            return
        vectors, keys = self.all_vectors()
        nlist = max(1, int(np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(self.params.dimension)
        ann = faiss.IndexIVFFlat(quantizer, self.params.dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        ann.train(vectors)
        ann.add_with_ids(vectors, keys)
        ann.nprobe = DEFAULT_NPROBE
        quantizer.this.disown()  # the IVF index owns (and frees) it from now on
        ann.own_fields = True
        self.ann, self.ann_trained_on, self.ann_file = ann, n, None


class SnapshotVectors:
    """The vectors a snapshot already holds, by the hash of the text they embed.

    Lets an edited file re-embed only the chunks whose text changed, and two copies of the
    same document share the embedding work. Asked lazily: a chunk dropped from the working
    snapshot (its vector gone) is no longer offered.
    """

    def __init__(self, snapshot: Snapshot, text_of: Callable[[Chunk], str]) -> None:
        self._snapshot = snapshot
        self._keys = {text_hash(text_of(chunk)): key for key, chunk in snapshot.chunks.items()}

    def prefetch(self, texts: Iterable[str]) -> None:
        """Nothing to do: the vectors are in memory."""

    def _key(self, h: bytes) -> int | None:
        key = self._keys.get(h)
        return key if key is not None and key in self._snapshot.chunks else None

    def has(self, h: bytes) -> bool:
        return self._key(h) is not None

    def get(self, h: bytes) -> np.ndarray | None:
        key = self._key(h)
        return None if key is None else self._snapshot.vector(key)


def text_hash(text: str) -> bytes:
    """The 16-byte digest a chunk's embedded text is known by (its vector depends on it alone)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def search_one(index: faiss.Index, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` for one query vector, on this thread alone.

    FAISS spreads even a single query over OpenMP threads. When another program holds a core
    (the browser drawing the question, the model server, indexing), the search waits at
    OpenMP's barrier for a thread that is not running: 10k flat vectors took 5.9 ms median
    (p90 21 ms) on two threads against 2.3 ms (p90 6 ms) on one with one core busy, and 1.6
    against 1.1 ms with none (docs/benchmarks.md). The thread count is OpenMP's per-thread
    setting: other threads (an index build) keep theirs, and this one gets its own back.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(vector.reshape(1, -1).astype(np.float32), n)
    finally:
        faiss.omp_set_num_threads(previous)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _chunk_to_json(key: int, chunk: Chunk) -> str:
    return json.dumps(
        {
            "key": key,
            "id": chunk.id,
            "source": chunk.source,
            "page": chunk.page,
            "start": chunk.start,
            "end": chunk.end,
            "headings": list(chunk.headings),
            "title": chunk.title,
            "table_header": chunk.table_header,
            "text": chunk.text,
        },
        ensure_ascii=False,
    )


def _chunk_from_json(line: str) -> tuple[int, Chunk]:
    raw = json.loads(line)
    chunk = Chunk(
        id=raw["id"],
        source=raw["source"],
        text=raw["text"],
        start=raw["start"],
        end=raw["end"],
        page=raw["page"],
        headings=tuple(raw["headings"]),
        title=raw["title"],
        table_header=raw.get("table_header", ""),
    )
    return int(raw["key"]), chunk


class IndexStore:
    """Reads and writes generations of the index under one directory."""

    kind = "embedded"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    def begin(self, old: Snapshot | None, params: IndexParams) -> Snapshot:
        """The working copy an update starts from: ``old`` itself (changed in place), or empty."""
        return old if old is not None else Snapshot(params=params)

    # -- reading -----------------------------------------------------------------------------

    def current_generation(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def read_manifest(self) -> dict | None:
        """The live manifest as stored, or None when nothing has been indexed."""
        for _ in range(3):
            generation = self.current_generation()
            if generation is None:
                return None
            with contextlib.suppress(FileNotFoundError):
                manifest = json.loads((self.root / generation / "manifest.json").read_text(encoding="utf-8"))
                if manifest.get("format") == FORMAT:
                    records, _ = self._read_records(manifest["segments"])
                    manifest["files"] = {
                        source: {"sha256": r.sha256, "size": r.size, "mtime_ns": r.mtime_ns,
                                 "chunk_ids": list(r.chunk_ids)}
                        for source, r in sorted(records.items())
                    }
                return manifest
        return None

    def load(self, *, expected: IndexParams | None = None, previous: Snapshot | None = None) -> Snapshot:
        """Load the live generation completely into memory (a consistent snapshot).

        Raises ``IndexMissingError`` when there is none and ``IndexMismatchError`` when it was
        written in another format or (given ``expected``) with other parameters. ``previous``
        (a snapshot loaded before) is accepted for the store interface; files are read whole.
        """
        for _ in range(3):
            generation = self.current_generation()
            if generation is None:
                raise IndexMissingError(
                    f"no index in {self.root}: run `python -m rag index` (or `make run`) to build it"
                )
            try:
                snapshot = self._load_generation(generation)
            except FileNotFoundError:
                continue  # a writer replaced and collected it between our two reads: retry
            if expected is not None:
                reason = expected.difference(snapshot.params)
                if reason:
                    raise IndexMismatchError(
                        f"the index in {self.root} was built differently ({reason}): "
                        "run `python -m rag index` to rebuild it"
                    )
            return snapshot
        raise IndexMismatchError(f"the index in {self.root} keeps changing under us; try again")

    def _read_records(self, segments: Sequence[dict]) -> tuple[dict[str, FileRecord], dict[str, str]]:
        """The file records the segments add up to (newest wins), and each one's segment."""
        records: dict[str, FileRecord] = {}
        home: dict[str, str] = {}
        for segment in segments:
            raw = json.loads((self.root / segment["name"] / "files.json").read_text(encoding="utf-8"))
            for source, rec in raw.items():
                home[source] = segment["name"]
                if rec is None:
                    records.pop(source, None)
                else:
                    records[source] = FileRecord(source=source, chunk_ids=tuple(rec.pop("chunk_ids")), **rec)
        return records, home

    def _load_generation(self, generation: str) -> Snapshot:
        manifest = json.loads((self.root / generation / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise IndexMismatchError(
                f"the index in {self.root} has format {manifest.get('format')!r}, this version reads "
                f"{FORMAT!r}: run `python -m rag index --full` to rebuild it"
            )
        params = IndexParams(**manifest["params"])
        segments = manifest["segments"]
        files, record_home = self._read_records(segments)
        live = {chunk_key(cid) for record in files.values() for cid in record.chunk_ids}
        # A chunk written twice (its file re-put) is read from the newest segment holding it.
        key_home: dict[int, str] = {}
        for segment in reversed(segments):
            keys = np.load(self.root / segment["name"] / "keys.npy")
            for key in keys.tolist():
                if key in live and key not in key_home:
                    key_home[key] = segment["name"]
        chunks: dict[int, Chunk] = {}
        vectors = faiss.IndexIDMap2(faiss.IndexFlatIP(params.dimension))
        keyword_parts = []
        by_segment: dict[str, set[int]] = {}
        for key, home in key_home.items():
            by_segment.setdefault(home, set()).add(key)
        for segment in segments:
            folder = self.root / segment["name"]
            mine = by_segment.get(segment["name"])
            if not mine:
                continue
            with open(folder / "chunks.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    key, chunk = _chunk_from_json(line)
                    if key in mine:
                        chunks[key] = chunk
            keys = np.load(folder / "keys.npy")
            whole = len(mine) == len(keys)  # nothing in it replaced since: no selection needed
            # Several copies of a key within one segment never happen: a segment is one commit's.
            if whole:
                vectors.add_with_ids(np.load(folder / "vectors.npy"), keys)
            else:
                rows = np.flatnonzero(np.isin(keys, np.fromiter(mine, np.int64, count=len(mine))))
                vectors.add_with_ids(np.ascontiguousarray(np.load(folder / "vectors.npy")[rows]), keys[rows])
            keyword_parts.append((KeywordIndex.load(folder / "keyword.npz"), None if whole else mine))
        if len(keyword_parts) == 1 and keyword_parts[0][1] is None:
            keyword = keyword_parts[0][0]
        else:
            keyword = KeywordIndex.merged(keyword_parts) if keyword_parts else KeywordIndex()
        ann = None
        ann_file = manifest.get("ann")
        if ann_file:
            ann = faiss.read_index(str(self.root / ann_file))
            ann.nprobe = DEFAULT_NPROBE
            held = np.load(self.root / (ann_file + ".keys.npy"))
            live_keys = np.fromiter(chunks, np.int64, count=len(chunks))
            gone = held[~np.isin(held, live_keys)]
            if len(gone):
                ann.remove_ids(gone)
            new = live_keys[~np.isin(live_keys, held)]
            if len(new):
                ann.add_with_ids(np.stack([vectors.reconstruct(int(k)) for k in new]), new)
        if vectors.ntotal != len(chunks) or len(keyword) != len(chunks) or len(chunks) != len(live):
            raise IndexMismatchError(
                f"the index generation {self.root / generation} is inconsistent ({vectors.ntotal} vectors, "
                f"{len(chunks)} chunks, {len(live)} listed): run `python -m rag index --full` to rebuild it"
            )
        return Snapshot(
            params=params,
            files=files,
            chunks=chunks,
            vectors=vectors,
            keyword=keyword,
            generation=generation,
            updated_at=float(manifest.get("updated_at", 0.0)),
            ann=ann,
            ann_trained_on=int(manifest.get("ann_trained_on", 0)),
            segments=list(segments),
            record_home=record_home,
            key_home=key_home,
            ann_file=ann_file,
        )

    # -- writing (only under the lock) --------------------------------------------------------

    def _next_name(self, prefix: str) -> str:
        number = max((self._generation_number(p.name, prefix) for p in self.root.glob(f"{prefix}-*")), default=0)
        return f"{prefix}-{number + 1:06d}"

    def _write_segment(
        self,
        snapshot: Snapshot,
        records: dict[str, FileRecord | None],
        keys: list[int],
        vectors: np.ndarray,
        keyword: KeywordIndex,
    ) -> dict:
        """One immutable segment: these records (None: a deletion) and chunks, renamed into place whole."""
        name = self._next_name("seg")
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        raw = {
            source: None if rec is None else
            {"sha256": rec.sha256, "size": rec.size, "mtime_ns": rec.mtime_ns, "chunk_ids": list(rec.chunk_ids)}
            for source, rec in sorted(records.items())
        }
        _write_file(tmp / "files.json", json.dumps(raw, ensure_ascii=False).encode("utf-8"))
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(_chunk_to_json(k, snapshot.chunks[k]) + "\n" for k in keys)
        with open(tmp / "keys.npy", "wb") as fh:
            np.save(fh, np.asarray(keys, dtype=np.int64))
        with open(tmp / "vectors.npy", "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), snapshot.params.dimension))
        keyword.save(tmp / "keyword.npz")
        for written in tmp.iterdir():
            _fsync_file(written)
        _fsync_dir(tmp)
        os.rename(tmp, self.root / name)
        return {"name": name, "rows": len(keys), "records": len(records)}

    def _vectors_of(self, snapshot: Snapshot, keys: list[int]) -> np.ndarray:
        assert snapshot.vectors is not None
        if not keys:
            return np.zeros((0, snapshot.params.dimension), np.float32)
        return np.asarray(snapshot.vectors.reconstruct_batch(np.asarray(keys, dtype=np.int64)), dtype=np.float32)

    def _merge(self, snapshot: Snapshot, merged: list[dict], *, oldest: bool) -> tuple[dict, list[str], list[int]]:
        """The live contents of ``merged`` (consecutive segments) as one segment, with the sources
        and keys that now live in it. Deletions are kept unless nothing older is left for them to
        hide. Reads the merged segments' own lists of files and keys, so that its cost is theirs,
        not the whole index's."""
        names = {seg["name"] for seg in merged}
        _, recorded = self._read_records(merged)  # every source the merged segments record
        moved = sorted(source for source in recorded if snapshot.record_home.get(source) in names)
        records: dict[str, FileRecord | None] = {}
        for source in moved:
            record = snapshot.files.get(source)
            if record is not None or not oldest:
                records[source] = record
        parts = []
        for seg in merged:
            held = np.load(self.root / seg["name"] / "keys.npy").tolist()
            mine = sorted(k for k in held if snapshot.key_home.get(k) == seg["name"] and k in snapshot.chunks)
            if mine:
                parts.append((KeywordIndex.load(self.root / seg["name"] / "keyword.npz"), mine))
        keyword = KeywordIndex.merged(parts) if parts else KeywordIndex()
        order = keyword._ids.tolist()  # the merged rows' order: vectors and chunks follow it
        segment = self._write_segment(snapshot, records, order, self._vectors_of(snapshot, order), keyword)
        return segment, moved, order

    def commit(self, snapshot: Snapshot, *, extra: dict | None = None) -> str:
        """Make ``snapshot`` the live generation, atomically, writing only what changed.

        A snapshot this store loaded (or committed) and that is still the live one gets one new
        segment with the records and chunks changed since, plus a small manifest: a one-file
        edit costs that file, whatever the corpus. Segments are merged when the newest grows to
        half the one before it (so there are O(log n) of them and each row is rewritten O(log n)
        times). Any other snapshot is written whole, as one segment.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        live = self.read_manifest_raw()
        based = snapshot.segments is not None and live is not None and live.get("segments") == snapshot.segments
        if based:
            segments = list(snapshot.segments or [])
            new_keys = [k for k in snapshot.new_texts if k in snapshot.chunks]
            keyword = KeywordIndex(k1=snapshot.keyword.k1, b=snapshot.keyword.b)
            keyword.add(new_keys, [snapshot.new_texts[k] for k in new_keys])
            if snapshot.dirty or new_keys:
                segment = self._write_segment(
                    snapshot, dict(snapshot.dirty), new_keys, self._vectors_of(snapshot, new_keys), keyword
                )
                segments.append(segment)
                self._adopt(snapshot, segment, snapshot.dirty.keys(), new_keys)
        else:
            snapshot.record_home, snapshot.key_home = {}, {}
            keyword = snapshot.keyword
            with keyword._lock:
                keyword._compact()  # rows in id order of the postings, as save() writes them
                keys = keyword._ids.tolist()
            segment = self._write_segment(
                snapshot, dict(snapshot.files), keys, self._vectors_of(snapshot, keys), keyword
            )
            segments = [segment]
            self._adopt(snapshot, segment, snapshot.files.keys(), keys)
            snapshot.ann_file = None
        while len(segments) >= 2 and 2 * _size(segments[-1]) >= _size(segments[-2]):
            merged, sources, keys = self._merge(snapshot, segments[-2:], oldest=len(segments) == 2)
            self._adopt(snapshot, merged, sources, keys)
            segments[-2:] = [merged]
        if len(segments) == 1:  # nothing older for a deletion to hide
            snapshot.record_home = {s: h for s, h in snapshot.record_home.items() if s in snapshot.files}
        name = self._next_name("gen")
        if snapshot.ann is not None and snapshot.ann_file is None:
            ann_file = f"ann-{name.removeprefix('gen-')}.faiss"
            faiss.write_index(snapshot.ann, str(self.root / ann_file))
            with open(self.root / (ann_file + ".keys.npy"), "wb") as fh:
                np.save(fh, np.fromiter(snapshot.chunks, np.int64, count=len(snapshot.chunks)))
            _fsync_file(self.root / ann_file)
            _fsync_file(self.root / (ann_file + ".keys.npy"))
            snapshot.ann_file = ann_file
        updated_at = time.time()
        manifest = {
            "format": FORMAT,
            "params": asdict(snapshot.params),
            "updated_at": updated_at,
            "chunk_count": len(snapshot.chunks),
            "file_count": len(snapshot.files),
            "ann_trained_on": snapshot.ann_trained_on,
            "ann": snapshot.ann_file if snapshot.ann is not None else None,
            "segments": segments,
            **(extra or {}),
        }
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        _write_file(tmp / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
        _fsync_dir(tmp)
        os.rename(tmp, self.root / name)
        pointer = self.root / f".{CURRENT}.tmp-{os.getpid()}"
        _write_file(pointer, name.encode("ascii"))
        os.replace(pointer, self.root / CURRENT)
        _fsync_dir(self.root)
        snapshot.generation = name
        snapshot.updated_at = updated_at
        snapshot.segments = segments
        snapshot.dirty, snapshot.new_texts = {}, {}
        self.collect_garbage()
        return name

    @staticmethod
    def _adopt(snapshot: Snapshot, segment: dict, sources: Iterable[str], keys: Iterable[int]) -> None:
        name = segment["name"]
        for source in list(sources):
            snapshot.record_home[source] = name
        for key in list(keys):
            snapshot.key_home[key] = name

    def read_manifest_raw(self) -> dict | None:
        generation = self.current_generation()
        if generation is None:
            return None
        try:
            return json.loads((self.root / generation / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def collect_garbage(self) -> None:
        """Remove leftovers of interrupted writes, generations older than the last two, and the
        segments and approximate indexes none of the kept generations uses."""
        live = self.current_generation()
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(f".{CURRENT}.tmp-*"):
            leftover.unlink(missing_ok=True)
        generations = sorted(self.root.glob("gen-*"), key=lambda p: self._generation_number(p.name))
        if live is None:
            return
        live_number = self._generation_number(live)
        keep = {p.name for p in generations if self._generation_number(p.name) <= live_number}
        keep = set(sorted(keep, key=self._generation_number)[-KEEP_GENERATIONS:])
        used: set[str] = set()
        for folder in generations:
            if folder.name not in keep and self._generation_number(folder.name) <= live_number:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                continue
            used.update(seg["name"] for seg in manifest.get("segments", []))
            if manifest.get("ann"):
                used.update((manifest["ann"], manifest["ann"] + ".keys.npy"))
        for path in [*self.root.glob("seg-*"), *self.root.glob("ann-*")]:
            if path.name not in used:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def size_on_disk(self) -> int:
        """Bytes of the live generation: its manifest, segments and approximate index."""
        manifest = self.read_manifest_raw()
        if manifest is None:
            return 0
        paths = [self.root / str(self.current_generation()) / "manifest.json"]
        for seg in manifest.get("segments", []):
            paths.extend((self.root / seg["name"]).iterdir())
        if manifest.get("ann"):
            paths += [self.root / manifest["ann"], self.root / (manifest["ann"] + ".keys.npy")]
        return sum(p.stat().st_size for p in paths if p.is_file())

    @staticmethod
    def _generation_number(name: str, prefix: str = "gen") -> int:
        try:
            return int(name.removeprefix(f"{prefix}-"))
        except ValueError:
            return -1

    @contextlib.contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the writer's lock; raises ``IndexLockedError`` when busy and not ``wait``."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "lock"
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise IndexLockedError(
                    f"the index in {self.root} is being updated by {holder}: wait for it to finish"
                ) from exc
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)


def _size(segment: dict) -> int:
    return max(1, int(segment["rows"]) + int(segment["records"]))


def keys_of(chunks: Iterable[Chunk]) -> list[int]:
    return [chunk_key(c.id) for c in chunks]

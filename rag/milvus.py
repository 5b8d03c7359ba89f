"""The index in Milvus: the embedded store's rows, searched by the server, shared by app replicas.

``RAG_VECTOR_STORE=milvus`` (``pip install '.[milvus]'``). The client code is the same for Milvus
Lite (``milvus-lite server``), a standalone server and a distributed cluster: only
``RAG_MILVUS_URI`` and ``RAG_MILVUS_TOKEN`` change. Collections, for ``RAG_MILVUS_COLLECTION=rag``::

    rag_meta            rows "state" (the live generation, epoch, parameters, counts) and "lock" (the writer)
    rag_e3_chunks       one row per chunk version: key, text, metadata, vector, stemmed terms -> BM25 sparse
    rag_e3_files        one row per file version: source, sha256, size, mtime, chunk ids

**Generations.** Every row carries ``gen_from`` and ``gen_to``; it belongs to generation G when
``gen_from <= G < gen_to``. A writer writes generation W = G + 1: it inserts new rows with
``gen_from = W`` and retires the rows it replaces by rewriting them with ``gen_to = W``, then
switches the "state" row to W with one single-row upsert. A reader reads the state row first and
filters every search by its generation, so it sees G whole until the switch and W whole after it,
never a half-applied update. Retired rows stay for ``grace_seconds`` after the switch (readers still
on G may be searching) and are then deleted. A writer killed at any moment leaves rows of a
generation nobody switched to: the next writer deletes them and revives the rows they retired.
Unchanged chunks of an edited file keep their rows: an edit writes only the rows that changed.

**Epochs.** The vector dimension is part of a collection's schema, so a full rebuild (another
model, other chunking, ``--full``) writes a new pair of collections (epoch + 1) and the same
state switch moves readers over; the old pair is dropped after the grace period.

**One writer.** Milvus has no row-level compare-and-set, but creating an alias is atomic (the root
coordinator serializes DDL through its meta store; a second ``create_alias`` of the same name
fails). The writer holds the alias ``rag_writer``; the "lock" row names it and carries a heartbeat
(refreshed by a thread every ``lock_ttl / 4``). A holder silent for ``lock_ttl`` is presumed dead
and its alias is dropped by the next writer; that break is the one step that is not atomic, so a
writer also checks, before each switch, that the lock row is still its own ("fencing").

**Keyword search** is the server's BM25 (a ``BM25`` function filling a sparse field), but over our
own terms: each chunk's text is tokenized and Snowball-stemmed here (``rag.keyword.tokenize``) and
stored space-separated, and so is each query, so both stores match the same words. Scores differ
between the stores (Milvus keeps term statistics per segment; Milvus Lite 3.2 returns them
negated), so only ranks are compared; a hit's score is reported as the positive BM25 value.

**Consistency.** Reads use ``Strong`` consistency, so that rows written before a switch are visible
to a search issued after reading it; on a cluster this waits for the query nodes to catch up
with the newest timestamp (the documented cost of Strong).

**Writes** are batched (500 rows a call) and each commit flushes what it wrote, compacting after
every 8 flushes or a large update: Milvus Lite searches unflushed rows slowly, and a cluster,
which seals and compacts by itself, only does it sooner.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from rag.errors import ConfigError, IndexLockedError, IndexMismatchError, IndexMissingError
from rag.index import FileRecord, IndexParams, chunk_key, text_hash
from rag.keyword import tokenize
from rag.types import Chunk

if TYPE_CHECKING:
    from rag.config import Settings

FORMAT = "rag-milvus v1"
LIVE = 2**62  # gen_to of a row nobody has retired
DEFAULT_GRACE_SECONDS = 600.0
DEFAULT_LOCK_TTL = 60.0
# Chunk ids per file row: a JSON field holds at most 64 KiB, and a file's ids can outgrow it.
IDS_PER_FILE_ROW = 1500
BATCH = 500
MAX_VARCHAR = 65535
MAX_SOURCE = 4096
STATE, LOCK = "state", "lock"
# Merge the small segments that every commit's flush leaves, after this many commits or rows.
COMPACT_AFTER_FLUSHES = 8
COMPACT_AFTER_ROWS = 2000
# Milvus's "whitespace" tokenizer splits exactly where we joined our stems. Milvus Lite 3.2 has
# only "standard" (which there is \w+ lowercased: the same split, our stems being \w+ runs).
ANALYZERS = ({"tokenizer": "whitespace"}, {"tokenizer": "standard"})

log = logging.getLogger("rag.milvus")


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise ConfigError(
            "RAG_VECTOR_STORE=milvus needs the Milvus client: pip install '.[milvus]' "
            "(or set RAG_VECTOR_STORE=embedded)"
        ) from exc
    return pymilvus


def _quote(value: str) -> str:
    """A string literal for a Milvus filter expression: ``notes/a "b".md`` -> ``"notes/a \\"b\\".md"``."""
    return json.dumps(value, ensure_ascii=False)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _quiet_client() -> Iterator[None]:
    """pymilvus logs every refused call with a traceback at ERROR; some refusals are expected
    (an analyzer the server lacks, an alias another writer holds) and handled by the caller."""
    logger, quiet = logging.getLogger("pymilvus.decorators"), _DropExpected()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _NoLiteIteratorWarning(logging.Filter):
    """Milvus Lite has no MVCC timestamp for query iterators; pymilvus warns on every batch and
    falls back to a client-side one, which is fine under Strong consistency."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NoLiteIteratorWarning())


def _visible(generation: int) -> str:
    return f"gen_from <= {generation} and gen_to > {generation}"


def _source_pk(source: str) -> str:
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _terms(text: str) -> str:
    """What BM25 sees of a text: our stems, space-separated (``"The red Apples" -> "red appl"``)."""
    return " ".join(tokenize(text))


class MilvusStore:
    """The index in one Milvus database, under a collection-name prefix."""

    kind = "milvus"

    def __init__(
        self,
        uri: str,
        *,
        token: str = "",
        collection: str = "rag",
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        index_type: str = "HNSW",
        timeout: float = 30.0,
    ) -> None:
        self.uri = uri
        self.token = token
        self.prefix = collection
        self.grace_seconds = grace_seconds
        self.lock_ttl = lock_ttl
        self.index_type = index_type
        self.timeout = timeout
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._holder: _Holder | None = None
        self._meta_ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> MilvusStore:
        return cls(settings.milvus_uri, token=str(settings.milvus_token), collection=settings.milvus_collection)

    @property
    def location(self) -> str:
        return f"Milvus collection {self.prefix!r} at {self.uri}"

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                pymilvus = _pymilvus()
                try:
                    self._client = pymilvus.MilvusClient(uri=self.uri, token=self.token, timeout=self.timeout)
                except Exception as exc:
                    raise ConfigError(
                        f"RAG_MILVUS_URI={self.uri!r}: no Milvus server answers there ({exc}); start it, or "
                        "check RAG_MILVUS_URI and RAG_MILVUS_TOKEN"
                    ) from exc
            return self._client

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- names and schemas ---------------------------------------------------------------------

    @property
    def meta_name(self) -> str:
        return f"{self.prefix}_meta"

    @property
    def lock_alias(self) -> str:
        return f"{self.prefix}_writer"

    def chunks_name(self, epoch: int) -> str:
        return f"{self.prefix}_e{epoch}_chunks"

    def files_name(self, epoch: int) -> str:
        return f"{self.prefix}_e{epoch}_files"

    def _ensure_meta(self) -> None:
        if self._meta_ready:
            return
        if not self.client.has_collection(self.meta_name):
            dt = _pymilvus().DataType
            schema = self.client.create_schema(auto_id=False)
            schema.add_field("pk", dt.VARCHAR, max_length=64, is_primary=True)
            schema.add_field("doc", dt.JSON)
            schema.add_field("_v", dt.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field in every collection
            index = self.client.prepare_index_params()
            index.add_index("_v", index_type="FLAT", metric_type="L2")
            self.client.create_collection(
                self.meta_name, schema=schema, index_params=index, consistency_level="Strong"
            )
        self._meta_ready = True

    def _create_epoch(self, epoch: int, dimension: int) -> None:
        pymilvus = _pymilvus()
        dt = pymilvus.DataType
        for name in (self.chunks_name(epoch), self.files_name(epoch)):
            if self.client.has_collection(name):
                self.client.drop_collection(name)  # left by a writer that never switched to it
        index = self.client.prepare_index_params()
        index.add_index("_v", index_type="FLAT", metric_type="L2")
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("pk", dt.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("source", dt.VARCHAR, max_length=MAX_SOURCE)
        schema.add_field("gen_from", dt.INT64)
        schema.add_field("gen_to", dt.INT64)
        schema.add_field("record", dt.JSON)
        schema.add_field("_v", dt.FLOAT_VECTOR, dim=2)
        self.client.create_collection(
            self.files_name(epoch), schema=schema, index_params=index, consistency_level="Strong"
        )
        last_error: Exception | None = None
        for analyzer in ANALYZERS:
            schema = self.client.create_schema(auto_id=False)
            schema.add_field("pk", dt.VARCHAR, max_length=64, is_primary=True)
            schema.add_field("key", dt.INT64)
            schema.add_field("gen_from", dt.INT64)
            schema.add_field("gen_to", dt.INT64)
            schema.add_field("source", dt.VARCHAR, max_length=MAX_SOURCE)
            schema.add_field("text_hash", dt.VARCHAR, max_length=32)
            schema.add_field("text", dt.VARCHAR, max_length=MAX_VARCHAR)
            schema.add_field("meta", dt.JSON)
            schema.add_field(
                "terms", dt.VARCHAR, max_length=MAX_VARCHAR, enable_analyzer=True, analyzer_params=analyzer
            )
            schema.add_field("sparse", dt.SPARSE_FLOAT_VECTOR)
            schema.add_field("vector", dt.FLOAT_VECTOR, dim=dimension)
            schema.add_function(
                pymilvus.Function(
                    name="bm25",
                    function_type=pymilvus.FunctionType.BM25,
                    input_field_names=["terms"],
                    output_field_names=["sparse"],
                )
            )
            index = self.client.prepare_index_params()
            if self.index_type == "HNSW":
                index.add_index("vector", index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 200})
            else:
                index.add_index("vector", index_type=self.index_type, metric_type="IP")
            index.add_index(
                "sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                params={"bm25_k1": 1.2, "bm25_b": 0.75},
            )
            for field in ("key", "source", "text_hash"):
                index.add_index(field, index_type="INVERTED")
            try:
                with _quiet_client():
                    self.client.create_collection(
                        self.chunks_name(epoch), schema=schema, index_params=index, consistency_level="Strong"
                    )
                return
            except _pymilvus().MilvusException as exc:
                if "tokenizer" not in str(exc):
                    raise
                last_error = exc
                log.info("analyzer %s refused (%s); trying the next", analyzer, exc)
        raise ConfigError(f"{self.location}: the server accepts none of the analyzers {ANALYZERS}: {last_error}")

    # -- the state row -------------------------------------------------------------------------

    def _read_meta(self, pk: str) -> dict | None:
        self._ensure_meta()
        rows = self.client.query(
            self.meta_name, filter=f"pk == {_quote(pk)}", output_fields=["doc"], consistency_level="Strong"
        )
        return dict(rows[0]["doc"]) if rows else None

    def _write_meta(self, pk: str, doc: dict) -> None:
        self._ensure_meta()
        self.client.upsert(self.meta_name, [{"pk": pk, "doc": doc, "_v": [0.0, 0.0]}])

    def _state(self) -> dict | None:
        state = self._read_meta(STATE)
        if state is not None and state.get("format") != FORMAT:
            raise IndexMismatchError(
                f"{self.location} holds format {state.get('format')!r}, this version reads {FORMAT!r}: "
                "run `python -m rag index --full` to rebuild it"
            )
        return state

    # -- reading -------------------------------------------------------------------------------

    def current_generation(self) -> str | None:
        state = self._state()
        return None if state is None else _generation_name(state["generation"])

    def read_manifest(self) -> dict | None:
        """The live state in the embedded manifest's shape (files included: one scan of the file rows)."""
        state = self._state()
        if state is None:
            return None
        files = self._load_files(state["epoch"], state["generation"])
        return {
            "format": FORMAT,
            "params": state["params"],
            "updated_at": state["updated_at"],
            "chunk_count": state["chunk_count"],
            "skipped": state.get("skipped", []),
            "files": {
                s: {"sha256": r.sha256, "size": r.size, "mtime_ns": r.mtime_ns, "chunk_ids": list(r.chunk_ids)}
                for s, r in sorted(files.items())
            },
        }

    def size_on_disk(self) -> int:
        """0: the data lives on the Milvus server, which does not report it per collection."""
        return 0

    def load(self, *, expected: IndexParams | None = None, previous: Any = None) -> MilvusSnapshot:
        """The live generation as a snapshot; its file list is read whole, or (given the
        ``previous`` snapshot of this store) only the file rows that changed since."""
        state = self._state()
        if state is None:
            raise IndexMissingError(
                f"no index in {self.location}: run `python -m rag index` (or `make run`) to build it"
            )
        params = IndexParams(**state["params"])
        if expected is not None:
            reason = expected.difference(params)
            if reason:
                raise IndexMismatchError(
                    f"the index in {self.location} was built differently ({reason}): "
                    "run `python -m rag index` to rebuild it"
                )
        epoch, generation = int(state["epoch"]), int(state["generation"])
        if (
            isinstance(previous, MilvusSnapshot)
            and previous.store is self
            and previous.epoch == epoch
            and int(state.get("collected_upto", 0)) <= previous.number <= generation
        ):
            files = self._advance_files(previous.files, epoch, previous.number, generation)
        else:
            files = self._load_files(epoch, generation)
        return MilvusSnapshot(self, state, params, files)

    def _load_files(self, epoch: int, generation: int, extra: str = "") -> dict[str, FileRecord]:
        rows = self._iterate(
            self.files_name(epoch), _visible(generation) + extra, ["pk", "source", "gen_from", "record"]
        )
        return _records(rows)

    def _advance_files(
        self, files: Mapping[str, FileRecord], epoch: int, old: int, new: int
    ) -> dict[str, FileRecord]:
        """``files`` at generation ``old`` brought to ``new`` from the rows switched in between."""
        out = dict(files)
        if new == old:
            return out
        retired = self._iterate(
            self.files_name(epoch), f"gen_to > {old} and gen_to <= {new}", ["source"]
        )
        for row in retired:
            out.pop(row["source"], None)
        out.update(self._load_files(epoch, new, f" and gen_from > {old}"))
        return out

    def _iterate(self, collection: str, filter: str, fields: list[str]) -> Iterator[dict]:
        iterator = self.client.query_iterator(
            collection, batch_size=1000, filter=filter, output_fields=fields, consistency_level="Strong"
        )
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    return
                yield from batch
        finally:
            iterator.close()

    # -- writing (only under the lock) ---------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[None]:
        """Be the one writer: hold the writer's alias; ``IndexLockedError`` when busy and not ``wait``."""
        self._ensure_meta()
        holder = _Holder(self, f"{socket.gethostname()} pid {os.getpid()}", uuid.uuid4().hex)
        while not holder.acquire():
            current = self._read_meta(LOCK) or {}
            if not wait:
                raise IndexLockedError(
                    f"the index in {self.location} is being updated by {current.get('holder', 'another writer')}: "
                    "wait for it to finish"
                )
            time.sleep(0.5)
        self._holder = holder
        try:
            yield
        finally:
            self._holder = None
            holder.release()

    def collect_garbage(self) -> None:
        """Undo what a killed writer left, delete rows retired longer than the grace period ago,
        and drop epochs nobody reads any more. Only under the lock."""
        state = self._state()
        epochs = self._epochs()
        live_epoch = None if state is None else int(state["epoch"])
        if state is None:
            for epoch in epochs:  # a first build that never switched
                self._drop_epoch(epoch)
            return
        generation = int(state["generation"])
        for epoch in epochs:
            if epoch > live_epoch:
                self._drop_epoch(epoch)  # a rebuild that never switched
        for name in (self.chunks_name(live_epoch), self.files_name(live_epoch)):
            self.client.delete(name, filter=f"gen_from > {generation}")
            revive = list(self._iterate(name, f"gen_to > {generation} and gen_to < {LIVE}", ["*"]))
            for start in range(0, len(revive), BATCH):
                rows = [_writable(row, gen_to=LIVE) for row in revive[start : start + BATCH]]
                self.client.upsert(name, rows)
        self._collect_retired(state)

    def _collect_retired(self, state: dict) -> None:
        now = time.time()
        old_enough = [g for g, at in state.get("commits", []) if at < now - self.grace_seconds]
        if old_enough:
            upto = max(old_enough)
            if upto > int(state.get("collected_upto", 0)):
                for name in (self.chunks_name(state["epoch"]), self.files_name(state["epoch"])):
                    self.client.delete(name, filter=f"gen_to <= {upto}")
                state["collected_upto"] = upto
            state["commits"] = [[g, at] for g, at in state["commits"] if g >= upto]
        retired = []
        for epoch, at in state.get("retired_epochs", []):
            if at < now - self.grace_seconds:
                self._drop_epoch(int(epoch))
            else:
                retired.append([epoch, at])
        state["retired_epochs"] = retired
        self._write_meta(STATE, state)

    def _epochs(self) -> list[int]:
        out = []
        head = f"{self.prefix}_e"
        for name in self.client.list_collections():
            if name.startswith(head) and name.endswith("_chunks"):
                with contextlib.suppress(ValueError):
                    out.append(int(name[len(head) : -len("_chunks")]))
        return sorted(out)

    def _drop_epoch(self, epoch: int) -> None:
        for name in (self.chunks_name(epoch), self.files_name(epoch)):
            if self.client.has_collection(name):
                self.client.drop_collection(name)

    def begin(self, old: MilvusSnapshot | None, params: IndexParams) -> MilvusUpdate:
        """The working copy of an update: ``old``'s generation continued, or (no ``old``: a
        first build or a rebuild) a new, empty epoch."""
        state = self._state()
        if old is not None:
            return MilvusUpdate(self, old.epoch, old.number, params, dict(old.files), old.chunk_count)
        epoch = self._epochs()[-1] + 1 if self._epochs() else 1
        if state is not None:
            epoch = max(epoch, int(state["epoch"]) + 1)
        self._create_epoch(epoch, params.dimension)
        base = 0 if state is None else int(state["generation"])
        return MilvusUpdate(self, epoch, base, params, {}, 0)

    def commit(self, update: MilvusUpdate, *, extra: dict | None = None) -> str:
        """Switch readers to everything ``update`` wrote: one upsert of the state row."""
        update.flush_inserts()
        if self._holder is not None:
            self._holder.check()
        state = self._state() or {}
        now = time.time()
        generation = update.generation
        retired_epochs = list(state.get("retired_epochs", []))
        commits = list(state.get("commits", []))
        if state and int(state["epoch"]) != update.epoch:
            retired_epochs.append([int(state["epoch"]), now])
            commits = []
        skipped = list((extra or {}).get("skipped", []))
        flushes = int(state.get("flushes", 0)) if state.get("epoch") == update.epoch else 0
        if update.rows_written:
            # Sealed, indexed segments: Milvus Lite searches unflushed rows by brute force in
            # Python (2k rows: 260 ms a search, 13 ms once flushed and compacted); a cluster
            # seals and compacts on its own, and these calls only make it happen now.
            for name in (update.chunks_name, update.files_name):
                self.client.flush(name)
            flushes += 1
            if flushes >= COMPACT_AFTER_FLUSHES or update.rows_written >= COMPACT_AFTER_ROWS:
                for name in (update.chunks_name, update.files_name):
                    self.client.compact(name)
                flushes = 0
            update.rows_written = 0
        new_state = {
            "format": FORMAT,
            "epoch": update.epoch,
            "generation": generation,
            "params": asdict(update.params),
            "updated_at": now,
            "chunk_count": update.chunk_count,
            "file_count": len(update.files),
            # The state row is one JSON value (64 KiB at most): a long skip list is cut.
            "skipped": skipped[:200],
            "skipped_count": len(skipped),
            "commits": [*commits, [generation, now]],
            "collected_upto": int(state.get("collected_upto", 0)) if state.get("epoch") == update.epoch else 0,
            "retired_epochs": retired_epochs,
            "flushes": flushes,
        }
        self._write_meta(STATE, new_state)
        update.switched()
        if self._holder is not None:
            self._collect_retired(new_state)
        return _generation_name(generation)


def _generation_name(number: int) -> str:
    return f"gen-{int(number):06d}"


def _writable(row: dict, **changes: Any) -> dict:
    """A queried row as an upsert wants it: function outputs left for the server to fill."""
    out = {k: v for k, v in row.items() if k != "sparse"}
    if "vector" in out:
        out["vector"] = [float(x) for x in out["vector"]]
    if "_v" in out:
        out["_v"] = [float(x) for x in out["_v"]]
    out.update(changes)
    return out


def _records(rows: Iterable[dict]) -> dict[str, FileRecord]:
    """File records from file rows (a record's chunk ids may span several rows)."""
    parts: dict[str, list[tuple[int, dict]]] = {}
    for row in rows:
        record = row["record"]
        parts.setdefault(row["source"], []).append((int(record.get("part", 0)), record))
    out = {}
    for source, pieces in parts.items():
        pieces.sort(key=lambda item: item[0])
        first = pieces[0][1]
        ids = tuple(cid for _, piece in pieces for cid in piece["chunk_ids"])
        out[source] = FileRecord(source, first["sha256"], int(first["size"]), int(first["mtime_ns"]), ids)
    return out


class _Holder:
    """The writer's side of the lock: the alias, the lock row, and its heartbeat thread."""

    def __init__(self, store: MilvusStore, name: str, token: str) -> None:
        self.store = store
        self.name = name
        self.token = token
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create_alias(self) -> bool:
        client = self.store.client
        if self.store.lock_alias in client.list_aliases(self.store.meta_name).get("aliases", []):
            return False
        try:
            with _quiet_client():
                client.create_alias(self.store.meta_name, self.store.lock_alias)
        except _pymilvus().MilvusException:
            return False  # another writer created it first
        return True

    def acquire(self) -> bool:
        store = self.store
        if not self._create_alias():
            row = store._read_meta(LOCK)
            # No row yet: a writer is between creating the alias and writing its row.
            if row is None or time.time() - float(row.get("heartbeat", 0)) < store.lock_ttl:
                return False
            again = store._read_meta(LOCK)
            if again is None or again.get("token") != row.get("token"):
                return False
            log.warning("breaking the lock of %s: no heartbeat for %.0f s", row.get("holder"), store.lock_ttl)
            with contextlib.suppress(Exception):
                store.client.drop_alias(store.lock_alias)
            if not self._create_alias():
                return False
        self._beat()
        self._thread = threading.Thread(target=self._heartbeats, name="rag-milvus-lock", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        self.store._write_meta(LOCK, {"holder": self.name, "token": self.token, "heartbeat": time.time()})

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.store.lock_ttl / 4):
            try:
                row = self.store._read_meta(LOCK)
                if row is None or row.get("token") != self.token:
                    self.lost = True
                    return
                self._beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the TTL allows three
                log.warning("could not renew the writer's lock on %s", self.store.location, exc_info=True)

    def check(self) -> None:
        """Fencing: refuse to switch generations once another writer has taken the lock."""
        row = self.store._read_meta(LOCK)
        if self.lost or row is None or row.get("token") != self.token:
            self.lost = True
            raise IndexLockedError(
                f"{self.store.location}: this writer lost its lock to "
                f"{(row or {}).get('holder', 'another writer')}; its work was not switched in"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            row = self.store._read_meta(LOCK)
            if row is not None and row.get("token") == self.token:
                self.store.client.delete(self.store.meta_name, filter=f"pk == {_quote(LOCK)}")
                self.store.client.drop_alias(self.store.lock_alias)


class MilvusVectors:
    """Vectors the collection already holds for a text (any row, any generation: a vector
    depends only on its text and the epoch's model), fetched by text hash before embedding."""

    def __init__(self, update: MilvusUpdate) -> None:
        self.update = update
        self._found: dict[bytes, np.ndarray] = {}

    def prefetch(self, texts: Iterable[str]) -> None:
        self.update.flush_inserts()
        wanted = sorted({text_hash(t) for t in texts} - set(self._found))
        name = self.update.store.chunks_name(self.update.epoch)
        for start in range(0, len(wanted), BATCH):
            hexes = [h.hex() for h in wanted[start : start + BATCH]]
            rows = self.update.store.client.query(
                name, filter=f"text_hash in {json.dumps(hexes)}", output_fields=["text_hash", "vector"],
                consistency_level="Strong",
            )
            for row in rows:
                self._found[bytes.fromhex(row["text_hash"])] = np.asarray(row["vector"], dtype=np.float32)

    def has(self, h: bytes) -> bool:
        return h in self._found

    def get(self, h: bytes) -> np.ndarray | None:
        return self._found.get(h)


class MilvusUpdate:
    """An update in progress: rows of generation ``generation`` written as the indexer goes,
    invisible to readers until ``MilvusStore.commit`` switches the state row."""

    def __init__(
        self,
        store: MilvusStore,
        epoch: int,
        base: int,
        params: IndexParams,
        files: dict[str, FileRecord],
        chunk_count: int,
    ) -> None:
        self.store = store
        self.epoch = epoch
        self.base = base
        self.generation = base + 1
        self.params = params
        self.files = files
        self.chunk_count = chunk_count
        self.rows_written = 0  # rows inserted or rewritten since the last commit
        # Inserts wait here until BATCH rows (or a read, or the commit): one insert call per file
        # made a 100k-chunk build take over 20 minutes on Milvus Lite.
        self._pending: dict[str, list[dict]] = {}

    def __len__(self) -> int:
        return self.chunk_count

    @property
    def chunks_name(self) -> str:
        return self.store.chunks_name(self.epoch)

    @property
    def files_name(self) -> str:
        return self.store.files_name(self.epoch)

    def vector_lookup(self, text_of: Callable[[Chunk], str]) -> MilvusVectors:
        return MilvusVectors(self)

    def update_ann(self, threshold: int) -> None:
        """Nothing to do: the server keeps its own vector index."""

    def switched(self) -> None:
        """The state now points at ``generation``: later writes go to the next one."""
        self.base = self.generation
        self.generation += 1

    def _insert(self, collection: str, rows: list[dict]) -> None:
        pending = self._pending.setdefault(collection, [])
        pending.extend(rows)
        self.rows_written += len(rows)
        if len(pending) >= BATCH:
            self.flush_inserts()

    def flush_inserts(self) -> None:
        """Send the inserts that wait; before any read of this update's rows, and at commit."""
        for collection, rows in self._pending.items():
            for start in range(0, len(rows), BATCH):
                self.store.client.insert(collection, rows[start : start + BATCH])
        self._pending = {}

    def _live_rows(self, collection: str, source: str, fields: list[str]) -> list[dict]:
        self.flush_inserts()
        return list(
            self.store._iterate(collection, f"source == {_quote(source)} and gen_to == {LIVE}", fields)
        )

    def _retire(self, collection: str, rows: Sequence[dict]) -> None:
        """Rows of this update are deleted (no reader ever saw them); older ones get ``gen_to``."""
        client = self.store.client
        mine = [row["pk"] for row in rows if int(row["gen_from"]) == self.generation]
        older = [_writable(row, gen_to=self.generation) for row in rows if int(row["gen_from"]) != self.generation]
        for start in range(0, len(mine), BATCH):
            client.delete(collection, ids=mine[start : start + BATCH])
        for start in range(0, len(older), BATCH):
            client.upsert(collection, older[start : start + BATCH])
        self.rows_written += len(older)

    def _write_record(self, record: FileRecord | None, source: str) -> None:
        if source in self.files:
            # A file new to this epoch has no live row (the lock holder's garbage collection
            # deleted any a killed writer left): no read, so a build's inserts stay batched.
            # Reading here for every file flushed each file's rows alone and filtered an
            # ever larger unsealed collection: a 100k-chunk build slowed to ~1,000 rows/min.
            self._retire(self.files_name, self._live_rows(self.files_name, source, ["*"]))
        if record is None:
            return
        ids = list(record.chunk_ids)
        rows = []
        for part, start in enumerate(range(0, max(len(ids), 1), IDS_PER_FILE_ROW)):
            doc = {"sha256": record.sha256, "size": record.size, "mtime_ns": record.mtime_ns,
                   "chunk_ids": ids[start : start + IDS_PER_FILE_ROW], "part": part}
            rows.append({"pk": f"{_source_pk(source)}.{self.generation}.{part}", "source": source,
                         "gen_from": self.generation, "gen_to": LIVE, "record": doc, "_v": [0.0, 0.0]})
        self._insert(self.files_name, rows)

    def put_file(
        self, record: FileRecord, chunks: Sequence[Chunk], vectors: np.ndarray, texts: Sequence[str]
    ) -> None:
        """Replace what was indexed for ``record.source``: rows of chunks that did not change
        (same id, same text, same context) stay; the others are retired and new ones inserted."""
        source = record.source
        if len(source.encode("utf-8")) > MAX_SOURCE:
            raise IndexMismatchError(f"{source[:80]}…: a path longer than {MAX_SOURCE} bytes cannot go to Milvus")
        if len({c.id for c in chunks}) != len(chunks):
            raise IndexMismatchError(f"chunk id collision while indexing {source}: rebuild with --full")
        new_rows = {}
        for chunk, vector, text in zip(chunks, vectors, texts, strict=True):
            new_rows[chunk.id] = {
                "key": chunk_key(chunk.id),
                "source": source,
                "text_hash": text_hash(text).hex(),
                "text": chunk.text,
                "meta": {"id": chunk.id, "page": chunk.page, "start": chunk.start, "end": chunk.end,
                         "headings": list(chunk.headings), "title": chunk.title,
                         "table_header": chunk.table_header},
                "terms": _terms(text),
                "vector": np.asarray(vector, dtype=np.float32).tolist(),
            }
        old_rows = self._live_rows(self.chunks_name, source, ["pk", "gen_from", "text_hash", "meta"]) \
            if source in self.files else []
        keep, retire = set(), []
        for row in old_rows:
            new = new_rows.get(row["meta"]["id"])
            if new is not None and new["text_hash"] == row["text_hash"] and new["meta"] == row["meta"]:
                keep.add(row["meta"]["id"])
            else:
                retire.append(row["pk"])
        if retire:
            self.flush_inserts()
            full = []
            for start in range(0, len(retire), BATCH):
                full += self.store.client.query(
                    self.chunks_name, filter=f"pk in {json.dumps(retire[start : start + BATCH])}",
                    output_fields=["*"], consistency_level="Strong",
                )
            self._retire(self.chunks_name, full)
        inserts = [
            {"pk": f"{cid}.{self.generation}", "gen_from": self.generation, "gen_to": LIVE, **row}
            for cid, row in new_rows.items()
            if cid not in keep
        ]
        self._insert(self.chunks_name, inserts)
        self._write_record(record, source)
        self.chunk_count += len(inserts) - len(retire)
        self.files[source] = record

    def touch_file(self, record: FileRecord) -> None:
        """A new stat for an unchanged file: only its file row changes."""
        self._write_record(record, record.source)
        self.files[record.source] = record

    def drop_file(self, source: str) -> None:
        if source not in self.files:
            return
        rows = self._live_rows(self.chunks_name, source, ["*"])
        self._retire(self.chunks_name, rows)
        self._write_record(None, source)
        self.chunk_count -= len(rows)
        del self.files[source]


class MilvusSnapshot:
    """One committed generation, searched on the server. Never changes under its reader: every
    call filters by its generation (rows stay ``grace_seconds`` after being replaced)."""

    def __init__(self, store: MilvusStore, state: dict, params: IndexParams, files: dict[str, FileRecord]) -> None:
        self.store = store
        self.params = params
        self.files = files
        self.epoch = int(state["epoch"])
        self.number = int(state["generation"])
        self.generation = _generation_name(self.number)
        self.updated_at = float(state["updated_at"])
        self.chunk_count = int(state["chunk_count"])
        self.chunks = _Chunks(self)

    def __len__(self) -> int:
        return self.chunk_count

    @property
    def collection(self) -> str:
        return self.store.chunks_name(self.epoch)

    @property
    def visible(self) -> str:
        return _visible(self.number)

    def _search(self, data: list, field: str, metric: str, n: int, params: dict) -> list[tuple[int, float]]:
        if n <= 0 or self.chunk_count == 0:
            return []
        result = self.store.client.search(
            self.collection, data=data, anns_field=field, limit=n, filter=self.visible,
            output_fields=["key"], search_params={"metric_type": metric, "params": params},
            consistency_level="Strong",
        )
        return [(int(hit["entity"]["key"]), float(hit["distance"])) for hit in result[0]]

    def dense_search(self, vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        vector = np.asarray(vector, dtype=np.float32).tolist()
        return self._search([vector], "vector", "IP", n, {"ef": max(64, n)})

    def keyword_search(self, query: str, n: int) -> list[tuple[int, float]]:
        terms = _terms(query)
        if not terms:
            return []
        # Best first as the server ranks them; Milvus Lite 3.2 negates BM25 scores (a cluster
        # returns them positive), so the reported score is the magnitude.
        return [(key, abs(score)) for key, score in self._search([terms], "sparse", "BM25", n, {})]

    def _rows(self, filter: str, fields: list[str]) -> list[dict]:
        return self.store.client.query(
            self.collection, filter=f"({filter}) and {self.visible}", output_fields=fields,
            consistency_level="Strong",
        )

    def fetch(self, keys: Sequence[int]) -> dict[int, tuple[Chunk, np.ndarray]]:
        """Each key's chunk and vector, in one query."""
        out: dict[int, tuple[Chunk, np.ndarray]] = {}
        keys = list(dict.fromkeys(int(k) for k in keys))
        for start in range(0, len(keys), BATCH):
            for row in self._rows(f"key in {keys[start : start + BATCH]}", ["key", "source", "text", "meta", "vector"]):
                out[int(row["key"])] = (_chunk(row), np.asarray(row["vector"], dtype=np.float32))
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(missing[0])
        return out

    def vector(self, key: int) -> np.ndarray:
        return self.fetch([key])[int(key)][1]

    def chunks_of(self, source: str) -> list[Chunk]:
        record = self.files.get(source)
        if record is None:
            return []
        rows = self._rows(f"source == {_quote(source)}", ["key", "source", "text", "meta"])
        by_id = {row["meta"]["id"]: _chunk(row) for row in rows}
        return [by_id[cid] for cid in record.chunk_ids if cid in by_id]


def _chunk(row: dict) -> Chunk:
    meta = row["meta"]
    return Chunk(
        id=meta["id"], source=row["source"], text=row["text"], start=int(meta["start"]), end=int(meta["end"]),
        page=meta["page"], headings=tuple(meta["headings"]), title=meta["title"],
        table_header=meta.get("table_header", ""),
    )


class _Chunks(Mapping[int, Chunk]):
    """``snapshot.chunks`` for Milvus: read from the server when asked, never held whole.
    Iterating it scans the collection: fine for tools, slow at scale."""

    def __init__(self, snapshot: MilvusSnapshot) -> None:
        self._snapshot = snapshot

    def __getitem__(self, key: int) -> Chunk:
        return self._snapshot.fetch([key])[int(key)][0]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int | np.integer):
            return False
        return bool(self._snapshot._rows(f"key == {int(key)}", ["key"]))

    def __len__(self) -> int:
        return self._snapshot.chunk_count

    def __iter__(self) -> Iterator[int]:
        for row in self._scan(["key"]):
            yield int(row["key"])

    def _scan(self, fields: list[str]) -> Iterator[dict]:
        return self._snapshot.store._iterate(self._snapshot.collection, self._snapshot.visible, fields)

    def values(self) -> Iterator[Chunk]:  # type: ignore[override]
        for row in self._scan(["key", "source", "text", "meta"]):
            yield _chunk(row)

    def items(self) -> Iterator[tuple[int, Chunk]]:  # type: ignore[override]
        for row in self._scan(["key", "source", "text", "meta"]):
            yield int(row["key"]), _chunk(row)

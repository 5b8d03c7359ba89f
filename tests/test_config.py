"""Settings: precedence, conversion, validation with messages that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.config import Secret, Settings, load_settings
from rag.errors import ConfigError


def test_defaults() -> None:
    s = load_settings(environ={}, dotenv=None)
    assert s == Settings()
    assert s.index_dir == Path(".rag/index") and s.max_file_bytes == 50 * 1024 * 1024


def test_precedence_overrides_then_environment_then_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("RAG_TOP_K=3\nRAG_RETRIEVAL_MODE='bm25'\nexport RAG_CHUNK_TOKENS=120 # comment\n")
    s = load_settings(environ={"RAG_TOP_K": "4"}, dotenv=dotenv)
    assert (s.top_k, s.retrieval_mode, s.chunk_tokens) == (4, "bm25", 120)
    s = load_settings(environ={"RAG_TOP_K": "4"}, dotenv=dotenv, top_k=9)
    assert s.top_k == 9


def test_types_are_converted() -> None:
    s = load_settings(environ={"RAG_DATA_DIR": "/tmp/x", "RAG_MIN_RELEVANCE": "0.4", "RAG_API_KEY": "sk-123secret"}, dotenv=None)
    assert s.data_dir == Path("/tmp/x") and s.min_relevance == 0.4
    assert isinstance(s.api_key, Secret) and s.api_key == "sk-123secret" and "sk-123secret" not in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RAG_TOP_K": "many"}, "RAG_TOP_K='many' is not a valid"),
        ({"RAG_RETRIEVAL_MODE": "magic"}, "RAG_RETRIEVAL_MODE='magic' is not one of"),
        ({"RAG_CHUNK_OVERLAP": "500"}, "RAG_CHUNK_OVERLAP=500 must be"),
        ({"RAG_TOP_K": "0"}, "RAG_TOP_K=0 must be at least 1"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env, dotenv=None)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown settings: nope"):
        load_settings(environ={}, dotenv=None, nope=1)

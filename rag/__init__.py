"""Local-first RAG: index your documents, retrieve passages, answer through Foundry Local."""

__version__ = "0.1.0"

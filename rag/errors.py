"""The one error tree of the project.

Every error a user can see is a ``RagError``; foreign exceptions are converted at the
boundary (``raise LoadError(...) from exc``) and the message says what to do about it::

    RagError
    ├── ConfigError            a setting is missing or invalid (names the variable)
    ├── PolicyError            the routing policy forbids a request (a non-local host under local-only)
    ├── LoadError              one file could not be read (names the file and the reason)
    ├── IndexError_            base for index problems (not the builtin IndexError)
    │   ├── IndexMissingError  nothing indexed yet (says to run `python -m rag index`)
    │   ├── IndexMismatchError the index on disk was built differently (format, model, chunking)
    │   └── IndexLockedError   another indexer holds the lock
    ├── EmbeddingError         the embedding model could not be loaded or run
    ├── ModelBuildError        building the offline chat model failed
    └── EndpointError          base for the chat endpoint
        ├── EndpointUnreachableError  connection refused, unknown host
        ├── EndpointTimeoutError      no connection in time, no first token, or too long between tokens
        ├── UnknownModelError         the endpoint does not serve the model asked for
        ├── ContextLengthError        the request does not fit the model's context window
        └── EndpointHTTPError         any other HTTP error, with the server's own message

The CLI and the app are the only places that turn these into user-facing output.
"""

from __future__ import annotations


class RagError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(RagError):
    """A setting is missing or invalid."""


class PolicyError(RagError):
    """The routing policy forbids a request (e.g. to a non-local host under ``local-only``)."""


class LoadError(RagError):
    """A file could not be loaded; ``reason`` is short and human-readable."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class IndexError_(RagError):  # noqa: N801 - trailing underscore: never shadow the builtin
    """Base for problems with the index on disk."""


class IndexMissingError(IndexError_):
    """No index has been built yet."""


class IndexMismatchError(IndexError_):
    """The index on disk was built with other settings or another format."""


class IndexLockedError(IndexError_):
    """Another process is updating the index."""


class EmbeddingError(RagError):
    """The embedding model could not be loaded or run."""


class ModelBuildError(RagError):
    """Building the offline chat model failed."""


class EndpointError(RagError):
    """Base for every problem talking to a chat-completions endpoint."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class EndpointUnreachableError(EndpointError):
    """Nothing answers at the endpoint's URL."""


class EndpointTimeoutError(EndpointError):
    """The endpoint answered too slowly (connect, first token, or between tokens)."""


class UnknownModelError(EndpointError):
    """The endpoint does not serve the requested model."""

    def __init__(self, message: str, *, url: str | None = None, available: tuple[str, ...] = ()) -> None:
        super().__init__(message, url=url)
        self.available = available


class ContextLengthError(EndpointError):
    """The request is longer than the model's context window."""


class EndpointHTTPError(EndpointError):
    """Any other HTTP error; carries the status and the server's own message."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message, url=url)
        self.status = status

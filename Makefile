# charlm: `make demo` trains and samples end to end; `make test` runs the test suite.
# Both create .venv first. GPU users: make TORCH_SPEC=torch TORCH_PIP_ARGS="--index-url <CUDA wheel index>" demo

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
CHARLM := $(BIN)/charlm
DEMO_RUN ?= checkpoints/demo

# A local corpus mirror (DIR/NAME/input.txt) is used when present; otherwise corpora come from their URLs.
CHARLM_CORPUS_MIRROR ?= $(firstword $(wildcard ../shared/corpora))
export CHARLM_CORPUS_MIRROR

.PHONY: demo test lint wheel-check venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: venv
	$(CHARLM) corpus get shakespeare
	rm -rf $(DEMO_RUN)
	$(CHARLM) train shakespeare --preset demo --out $(DEMO_RUN)
	$(CHARLM) eval $(DEMO_RUN)/best.safetensors --split val
	$(CHARLM) sample $(DEMO_RUN)/best.safetensors --length 500 --temperature 0.8 --seed 1 --prime "ROMEO:"

test: venv
	$(BIN)/python -m pytest -q tests

# Lint, format and types (pinned versions: pyproject.toml's dev extra); .ci/run runs it after the tests.
lint: venv
	$(BIN)/ruff check charlm tests benchmarks
	$(BIN)/ruff format --check charlm tests benchmarks
	$(BIN)/mypy

# Build a wheel, install it into a fresh venv beside the pinned torch, use it from an empty directory.
wheel-check: venv
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" TORCH_PIP_ARGS="$(TORCH_PIP_ARGS)" bash .ci/wheel_check.sh

bench: venv
	$(CHARLM) bench

clean:
	rm -rf $(VENV) corpora/.cache

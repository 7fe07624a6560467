# Two commands set everything up on a fresh machine (Python >= 3.11):
#   make quickstart   creates .venv, installs the project and runs the main job on embedded defaults
#   make test         creates .venv, installs the project with its test extra, runs ruff and the tests
#                     (all but the long system tests marked `slow`: about 10 minutes on 2 cores)
#   make test-all     the same with the long system tests (fault injection, tune, submit): what CI runs
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision: the versions tested here. On a GPU machine any CUDA build >= these works;
# override e.g. TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv quickstart test test-all lint

$(BIN)/dhrcnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/dhrcnn

venv: $(BIN)/dhrcnn

quickstart: venv
	$(BIN)/dhrcnn quickstart

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

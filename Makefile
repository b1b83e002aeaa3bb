# Both targets set themselves up in .venv from nothing but Python and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: this version resolves to the CPU wheel; an unpinned torch pulls a
# multi-GB CUDA build. On a GPU machine install the CUDA torch of your choice before `make`.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/mixerzoo demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) results runs .pytest_cache

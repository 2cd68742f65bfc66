# Every target sets up .venv (inside the repository) from the requirement files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# Reinstall only when a requirement file changes.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(PY) experiments.py study --dataset synthetic --quick

test: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	MPLBACKEND=Agg $(PY) benchmarks/bench_augment.py
	MPLBACKEND=Agg $(PY) benchmarks/bench_training.py

clean:
	rm -rf $(VENV) .pytest_cache

# Every target sets up .venv (inside the repository) from the requirement files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench gallery gpu-wheels clean

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

# One pytest worker per core (pytest-xdist, at most 8), each test handed to whichever worker is free.
test: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q -n auto --maxprocesses 8 --dist worksteal --durations=15

# The README's figure gallery: thumbnails of the main figures from reports/runs (run `make demo` first).
gallery: $(STAMP)
	MPLBACKEND=Agg $(PY) experiments.py figures --gallery docs/gallery

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The CPU benchmarks at sizes that take a few minutes on 2 idle cores (JSON in benchmarks/results/).
bench: $(STAMP)
	MPLBACKEND=Agg $(PY) benchmarks/bench_augment.py --device cpu --n 2048 --n-per-sample 512
	MPLBACKEND=Agg $(PY) benchmarks/bench_training.py --device cpu --quick

# Wheels for the GPU machine (benchmarks/wheels.txt), which has no package index: CPython 3.12 on x86-64
# Linux, whatever this machine is. Only pip is needed, not the venv. Emptied first: one version of each.
WHEELS := .whl
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux1_x86_64
gpu-wheels:
	rm -rf $(WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(WHEEL_PLATFORMS)) -d $(WHEELS) -r benchmarks/wheels.txt
	@ls -l $(WHEELS) && du -sh $(WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache

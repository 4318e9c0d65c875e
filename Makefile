PY ?= .venv/bin/python
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
PRELOAD := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)

SHAPE ?= e2b
ACCEPTANCE ?= 0.6,0.7,0.8,0.9

.PHONY: install test demo bench bench-shape lint

install:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: the test extra must not pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

test:
	# Two processes, each test file whole on one (its fixtures built once): the suite in half
	# the time on a 2-core machine.
	$(PY) -m pytest -n 2 --dist loadfile

demo:
	# The Shakespeare demo pair shipped in the package: runs offline, on any machine (gemma-chat
	# preloads OpenBLAS on Linux by itself).
	.venv/bin/gemma-chat --model demo

bench:
	$(PRELOAD) $(PY) scripts/bench.py

bench-shape:
	# Random weights with a real Gemma 4 shape, simulated acceptance (make bench-shape SHAPE=e4b).
	# One BLAS thread: the other core runs the host's Python, as a Mac's CPU does beside its GPU.
	$(PRELOAD) OPENBLAS_NUM_THREADS=1 $(PY) scripts/bench.py --shape $(SHAPE) --acceptance $(ACCEPTANCE)

lint:
	$(PY) -m ruff check gemma_mtp_mlx tests scripts fixtures

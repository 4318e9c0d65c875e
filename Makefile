PY ?= .venv/bin/python
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
PRELOAD := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)

.PHONY: install test demo bench lint

install:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: the test extra must not pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

test:
	$(PY) -m pytest

demo:
	# The Shakespeare demo pair shipped in the package: runs offline, on any machine (gemma-chat
	# preloads OpenBLAS on Linux by itself).
	.venv/bin/gemma-chat --model demo

bench:
	$(PRELOAD) $(PY) scripts/bench.py

lint:
	$(PY) -m ruff check gemma_mtp_mlx tests scripts fixtures

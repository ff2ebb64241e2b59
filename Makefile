# The two commands a new user runs on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install vlmcore (editable) with pinned CPU versions first.
# On a GPU machine with its own torch, use `pip install -e .[train,bench]` instead (see README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmcore-installed
PYTEST_ARGS ?=
# Never put the current directory (the repository root) on sys.path: there the folder kernels/ would
# be found as a top-level `kernels`, the name of the PyPI package transformers imports (see
# kernels/__init__.py, which also steps aside for the commands users type themselves).
export PYTHONSAFEPATH := 1

.PHONY: setup test test-fast demo bench-cpu lint clean

setup: $(STAMP)

$(STAMP): setup.py constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev,train,bench,eval,video]'
	# open_clip / timm for the tower tests, WITHOUT their dependencies: they require torchvision, whose
	# registry wheels are CUDA builds that replace the CPU torch (tests give them a stand-in instead).
	# open-flamingo likewise: tests/eval compares the VQA metric with its eval/vqa_metric.py.
	$(PY) -m pip install -q --no-deps -c constraints-cpu.txt open-clip-torch timm ftfy wcwidth open-flamingo==2.0.1
	touch $(STAMP)

## Whole test suite (CPU: kernels run in the Triton interpreter; GPU-marked tests skip).
test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

## Everything but the slow and multi-process tests, for quick iteration.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not distributed" $(PYTEST_ARGS)

## The main job (see README).
demo: $(STAMP)
	$(PY) -m vlmcore.train.tools.demo

## CPU microbenchmarks of the reference paths (pytest-benchmark), kept out of `make test`.
bench-cpu: $(STAMP)
	$(PY) -m pytest bench/cpu_microbench.py --benchmark-only -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check kernels vlmcore train bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

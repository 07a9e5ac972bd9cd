# Every target installs what it needs by itself: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help setup demo web matrix bench test test-all clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and alone: the CPU build pinned here; nothing after it may replace it
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned versions (requirements.txt)

demo: $(STAMP)  ## export the demo model to a verified .pte (recipe android_dev)
	$(PY) run.py recipe=android_dev

web: $(STAMP)  ## export the demo model to a verified .onnx (recipe web_dev)
	$(PY) run.py recipe=web_dev

matrix: $(STAMP)  ## FP32/FP16/INT8 x ONNX/PTE on the demo model, one report
	$(PY) run.py -m recipe=matrix

bench: $(STAMP)  ## cold vs warm sweep, sweep vs single runs, size ratios
	$(PY) -m pipelines.bench

test: $(STAMP)  ## the test suite (CI runs this)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## the test suite including the slow end-to-end tests
	$(PY) -m pytest -q -m "slow or not slow"

clean:  ## remove runs, sweeps and the cache (keeps .venv and checkpoints)
	rm -rf outputs .pytest_cache

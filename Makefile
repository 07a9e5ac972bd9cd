# Every target installs what it needs by itself: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help setup bytecode web-runtime device-runtimes corpus-deps ui-deps demo web ui matrix bench scale corpus test test-all cluster-test check-artifact \
        cache-list cache-prune clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and alone: the CPU build pinned here; nothing after it may replace it
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned versions (requirements.txt)

# the project's own modules byte-compiled, so no run compiles them again, PYTHONDONTWRITEBYTECODE
# set or not (as pip does for site-packages); 40 ms when they are current
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 pipelines stages models devices hydra_plugins run.py >/dev/null

web-runtime:  ## Debian's Chromium + onnxruntime-web (web/package-lock.json), for web targets
	sh web/install.sh

device-runtimes: $(STAMP)  ## emulated ARM64 phones/servers and x86 without VNNI (qemu-user), for verify_target
	$(PYTHON) devices/install.py

CORPUS_STAMP := $(VENV)/.corpus-installed
$(CORPUS_STAMP): $(STAMP) requirements-corpus.txt
	# test-only: transformers for the corpus and the text model; requirements.txt pins torch
	$(PY) -m pip install --quiet -r requirements-corpus.txt -c requirements.txt
	touch $(CORPUS_STAMP)

corpus-deps: $(CORPUS_STAMP)  ## transformers & co. (requirements-corpus.txt), for the corpus and text_bert

UI_STAMP := $(VENV)/.ui-installed
$(UI_STAMP): $(STAMP) requirements-ui.txt
	$(PY) -m pip install --quiet -r requirements-ui.txt -c requirements.txt
	touch $(UI_STAMP)

ui-deps: $(UI_STAMP)  ## FastAPI + uvicorn for the export panel

UI_TEST_STAMP := $(VENV)/.ui-test-installed
$(UI_TEST_STAMP): $(UI_STAMP) requirements-ui-test.txt
	# test-only: Playwright, driving Debian's Chromium (no browser download)
	$(PY) -m pip install --quiet -r requirements-ui-test.txt -c requirements.txt
	touch $(UI_TEST_STAMP)

demo: bytecode device-runtimes  ## export the demo model to a verified .pte (recipe android_dev)
	$(PY) run.py recipe=android_dev

web: bytecode web-runtime  ## export the demo model to a .onnx verified natively and in Chromium (web_dev)
	$(PY) run.py recipe=web_dev

PORT ?= 8765
ui: $(UI_STAMP) web-runtime device-runtimes  ## the export panel on http://127.0.0.1:$(PORT)/ (PORT=..., FOLDERS="checkpoints ~/models")
	$(PY) -m pipelines.ui --port $(PORT) $(if $(FOLDERS),--folders $(FOLDERS))

matrix: bytecode web-runtime device-runtimes  ## FP32/FP16/INT8 x ONNX/PTE on the demo model, one report (matrix.html)
	$(PY) run.py -m recipe=matrix

bench: bytecode web-runtime  ## cold vs warm sweep, sweep vs single runs, cold cell vs a hand script, sizes
	$(PY) -m pipelines.bench

scale: bytecode web-runtime  ## time, peak memory per stage and disk at 1M/10M/100M (BIG=1 adds 1B; FAMILY=generator: int4 LMs)
	$(PY) -m pipelines.scale $(if $(FAMILY),--family $(FAMILY)) $(if $(BIG),--with-1b)

CORPUS_SWEEP := outputs/multirun/corpus/$(shell date +%Y-%m-%d_%H-%M-%S)
corpus: $(CORPUS_STAMP)  ## 24 real architectures x the six cells, the cell table (slow: about 1.5 hours)
	$(PY) run.py -m recipe=corpus 'hydra.searchpath=[file://$(CURDIR)/corpus/conf]' \
	    hydra.sweep.dir=$(CORPUS_SWEEP) || $(PY) -m pipelines.matrix $(CORPUS_SWEEP)

PARALLEL := -n auto --maxprocesses=4 --dist loadfile  # a file's tests share one worker (module fixtures)

test: bytecode web-runtime device-runtimes $(CORPUS_STAMP) $(UI_TEST_STAMP)  ## the test suite (CI runs this; installs its test-only deps)
	$(PY) -m pytest -q $(PARALLEL) --durations=10

test-all: bytecode web-runtime device-runtimes $(CORPUS_STAMP) $(UI_TEST_STAMP)  ## the test suite including the slow tier (the corpus)
	$(PY) -m pytest -q $(PARALLEL) -m "slow or not slow"

cluster-test: bytecode  ## sweeps through a real one-node Slurm on localhost (installs slurm-wlm and munge; 95 s)
	$(PY) -m pytest -q -m slow tests/test_slurm.py

check-artifact: bytecode  ## re-run an artifact's test cases: make check-artifact ARTIFACT=path [DEVICE=cortex-a76]
	$(PY) -m pipelines.check_artifact $(ARTIFACT) $(if $(DEVICE),--device $(DEVICE))

CACHE ?= outputs/cache
cache-list: $(STAMP)  ## cache entries by stage, count and size (ALL=1: one line per entry)
	$(PY) -m pipelines.cache list --cache-dir $(CACHE) $(if $(ALL),--all)

cache-prune: $(STAMP)  ## remove entries unused for AGE (7d), or LRU ones beyond SIZE (e.g. 10G); DRY=1 to see
	$(PY) -m pipelines.cache prune --cache-dir $(CACHE) --older-than $(or $(AGE),7d) $(if $(SIZE),--max-size $(SIZE)) $(if $(DRY),--dry-run)

clean:  ## remove runs, sweeps and the cache (keeps .venv and checkpoints)
	rm -rf outputs .pytest_cache

# Quick start: `make demo` (train the tiny CLIP on the embedded demo data) and `make test`.
# Both set up everything themselves: the virtualenv, pinned packages, the demo shards.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo demo-data test test-fast clean

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# Pinned torch first: an unpinned one pulls a ~5 GB CUDA build on a CPU machine.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	# No build isolation: deepspeed's sdist must build against the torch installed above.
	$(BIN)/pip install --quiet --no-build-isolation -r requirements.txt
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

venv: $(STAMP)

data_shards/demo/manifest.json: | $(STAMP)
	$(BIN)/ds-trainer demo-data --out data_shards/demo

demo-data: data_shards/demo/manifest.json

# The first DeepSpeed run on a CPU compiles two C++ ops (~1-4 min, cached in ~/.cache/torch_extensions).
demo: venv demo-data
	rm -rf runs/demo
	./launch.sh --config ds_configs/demo.yaml
	$(BIN)/python scripts/show_metrics.py runs/demo/metrics.jsonl

test: venv
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Everything but the tests marked distributed: no deepspeed launcher, no Slurm.
test-fast: venv
	$(BIN)/python -m pytest tests -m "not distributed" $(PYTEST_ARGS)

clean:
	rm -rf runs results .pytest_cache

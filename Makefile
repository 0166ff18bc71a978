# Quick start: `make demo` (train the tiny CLIP on the embedded demo data) and `make test`.
# Both set up everything themselves: the virtualenv, pinned packages, the demo shards.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv ops demo demo-data test test-slow test-unit test-bench test-fast lint soak bench errors-doc clean

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

# DeepSpeed's CPU ops, compiled here rather than inside a launch or a test's timeout, into this
# environment's own directory (.venv/torch_extensions unless TORCH_EXTENSIONS_DIR is set) with its
# own ninja, as every launch looks for them (ds_trainer/ops.py). No stamp: the script checks the
# ops themselves in a few seconds, so a deleted directory or a new TORCH_EXTENSIONS_DIR is rebuilt here.
ops: $(STAMP)
	$(BIN)/python scripts/build_ops.py

data_shards/demo/manifest.json: | $(STAMP)
	$(BIN)/ds-trainer demo-data --out data_shards/demo

demo-data: data_shards/demo/manifest.json

# `ops` compiles DeepSpeed's CPU ops once (~2-4 min the first time, then cached in the environment).
demo: ops demo-data
	rm -rf runs/demo
	./launch.sh --config ds_configs/demo.yaml
	$(BIN)/python scripts/show_metrics.py runs/demo/metrics.jsonl
	# The benchmark protocol on the newest checkpoint, then the report (plots + report.html; its path last).
	$(BIN)/ds-trainer eval --config ds_configs/demo.yaml --load-dir runs/demo/checkpoints --report runs/demo/report

# Slurm, munge, Chromium and a font for the tests that use them (as root with apt-get; else they skip).
.PHONY: system-deps
system-deps:
	bash scripts/install_system_deps.sh

# Every test but the long ones (`make test-slow`) and the benchmark scripts' smoke tests
# (`make test-bench`); .ci/run runs all three.
test: ops system-deps
	$(BIN)/python -m pytest tests -m "not bench and not slow" $(PYTEST_ARGS)

# The tests marked slow: the demo to its AUC, the elastic chain at ZeRO 1 and 3, the fault chains, Slurm's two nodes.
test-slow: ops system-deps
	$(BIN)/python -m pytest tests -m "slow and not bench" $(PYTEST_ARGS)

# The benchmark scripts start and write their results on tiny settings (the benchmarks: `make bench`).
# It builds the GPU machine's wheels first (~20 s, PyPI) so the checks of that folder run, not skip.
test-bench: ops gpu-wheels
	$(BIN)/python -m pytest tests -m bench $(PYTEST_ARGS)

# The wheels benchmarks/gpu_suite.sh installs on the GPU machine (benchmarks/gpu_wheels/, ignored by git).
.PHONY: gpu-wheels
gpu-wheels: benchmarks/gpu_wheels/manifest.json
benchmarks/gpu_wheels/manifest.json: $(STAMP) benchmarks/gpu_env.py benchmarks/gpu_machine_packages.txt requirements.txt
	PYTHON=$(BIN)/python bash benchmarks/gpu_wheels.sh

# Everything but the tests marked distributed: no deepspeed launcher, no Slurm.
test-fast: ops
	$(BIN)/python -m pytest tests -m "not distributed" $(PYTEST_ARGS)

# Only the tests marked unit (pure: no processes, no DeepSpeed engine): seconds, so no ops build.
# One OpenMP thread unless set: with OMP_NUM_THREADS unset these tiny models run ~3x slower here (25 s vs 9 s).
test-unit: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest tests -m unit $(PYTEST_ARGS)

# Formatting and lint (ruff.toml; ruff pinned in requirements.txt). `ruff format` / `ruff check --fix` repair.
LINT_PATHS := ds_trainer tests benchmarks scripts
lint: $(STAMP)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)

# CPU benchmarks (ratios measured in one run; see benchmarks/README.md): each writes
# benchmarks/results/<name>.json, then benchmarks/RESULTS.md is rendered from them. ~10 min on 2 cores,
# plus loader.py's ~15 (its shard sets are made once, ~5 of those, and cached in the temp dir).
# On a GPU machine: bash benchmarks/gpu_suite.sh.
bench: ops demo-data
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/vs_hf_trainer.py
	$(BIN)/python benchmarks/vs_hf_trainer.py --defaults
	$(BIN)/python benchmarks/preemption_poll.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/prepared_shards.py
	$(BIN)/python benchmarks/decode_path.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/loader_profile.py
	$(BIN)/python benchmarks/zero_memory.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/speed_switches.py
	$(BIN)/python benchmarks/write_results.py

# Random rank kills and resumes of a 2-rank run (tests/soak; at most 10 minutes; SOAK_SEED replays one).
soak: ops
	$(BIN)/python -m pytest tests/soak -q -s $(PYTEST_ARGS)

# docs/errors.md from the refusal table's real CLI runs (tests/test_refusals.py checks it is current).
errors-doc: ops
	DS_TRAINER_WRITE_ERRORS_DOC=1 $(BIN)/python -m pytest tests/test_refusals.py -q

clean:
	rm -rf runs results .pytest_cache

# The project's two set-up/run commands live here; see README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test lint demo claims

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"

# Two pytest workers: most tests run one process on one core; those that start several processes share one
# worker (the xdist_group "processes"), so they never run two at a time.
test: install
	$(BIN)/ruff check uniperceiver_cli tests benchmarks
	$(BIN)/pytest -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check uniperceiver_cli tests benchmarks

# The main job: ToyWorld, multi-task pre-training of the tiny model, evaluation of every ToyWorld task
# (the zero-shot ones included) and the results table against the targets.
demo: install
	@start=$$(date +%s); rm -rf runs/toyworld-tiny; \
	$(BIN)/uniperceiver prepare-data toyworld --out data/toyworld --workers 2 && \
	$(BIN)/uniperceiver pretrain --recipe toyworld-tiny --run-dir runs/toyworld-tiny && \
	$(BIN)/python benchmarks/demo_targets.py runs/toyworld-tiny --seconds $$(( $$(date +%s) - start ))

# The papers' claims at ToyWorld scale: tuning, dense against MoE, routing levels (2 h 40 min on 2 cores;
# reuses `make demo`'s run when it is current). Writes docs/claims.md.
claims: install
	$(BIN)/pip install --quiet -e ".[claims]"
	$(BIN)/uniperceiver prepare-data toyworld --out data/toyworld --workers 2
	$(BIN)/python benchmarks/claims.py

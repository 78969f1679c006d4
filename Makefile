# Two commands on a fresh clone: `make demo` and `make test`. Everything they need is installed here.
# `make test-cluster` (CI runs it after `make test`) adds the cluster tests of tests/cluster: see README.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d" " -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_DIR ?= demo-out

CLUSTER_STAMP := $(VENV)/.cluster-$(shell cat pyproject.toml Makefile | cksum | cut -d" " -f1)

.PHONY: venv demo test test-cluster cluster-deps lint bench clean node-install

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[s3,torch,ray,capture,dev,saelens,dictlearn]'
	# without their dependencies: see the dictlearn extra in pyproject.toml
	$(BIN)/python -m pip install -q --no-deps 'dictionary-learning==0.1.0' 'nnsight==0.3.7'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/shuffler demo $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -x --durations=15 --ignore=tests/cluster

# Debian's SLURM (slurmctld, slurmd, sbatch, sacct) and iproute2 (`ip`, for tests/cluster/netns.sh), installed
# as root with apt-get when missing, plus the `cluster` extra. The daemons are started by the tests, never as
# services. The tests run in a network namespace of their own whose only device is lo (unshare --net), so
# every server they start is reachable on loopback only.
cluster-deps: $(CLUSTER_STAMP)

$(CLUSTER_STAMP): $(STAMP)
	@if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sacct >/dev/null \
	    || ! command -v ip >/dev/null; then \
	  echo "== apt-get install slurm-wlm iproute2"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm iproute2 >/dev/null; \
	fi
	$(BIN)/python -m pip install -q -e '.[cluster]'
	rm -f $(VENV)/.cluster-*
	touch $@

test-cluster: cluster-deps
	unshare --net tests/cluster/netns.sh $(BIN)/python -m pytest -x --durations=15 tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check .

# Quick versions of every benchmark (a few minutes); the full runs and their results are in docs/benchmarks.md.
BENCHES := codec read shuffle fused train capture interop storage peers scaling shuffle_matters costmodel permutation threads resume cpu fields levels
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	@for b in $(BENCHES); do echo "== benchmarks/$$b.py --quick"; $(BIN)/python benchmarks/$$b.py --quick || exit 1; done

# The cluster-node install (install-node.sh, docs/cluster.md) in a fresh venv, then a small array-job shuffle
# through it, as a node runs one. CI runs it after the tests (.ci/run).
NODE_VENV ?= /tmp/activation-shuffler-node
node-install:
	rm -rf $(NODE_VENV)
	sh install-node.sh $(NODE_VENV)
	$(NODE_VENV)/bin/shuffler synth $(NODE_VENV)/raw --rows 20000 --d-model 16
	$(NODE_VENV)/bin/shuffler shuffle $(NODE_VENV)/raw $(NODE_VENV)/shuffled --seed 0 --stage plan --num-tasks 2
	for s in scatter scatter2 permute; do for i in 0 1; do \
	  $(NODE_VENV)/bin/shuffler shuffle $(NODE_VENV)/raw $(NODE_VENV)/shuffled --seed 0 --stage $$s --task-index $$i --num-tasks 2 || exit 1; \
	done; done
	$(NODE_VENV)/bin/shuffler shuffle $(NODE_VENV)/raw $(NODE_VENV)/shuffled --seed 0 --stage finalize
	$(NODE_VENV)/bin/shuffler verify $(NODE_VENV)/raw $(NODE_VENV)/shuffled --full
	rm -rf $(NODE_VENV)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

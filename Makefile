# Two commands on a fresh machine:
#   make run    set up, then run Redis (a private local server), the gateway, its relay and
#               the bundled orders service; Ctrl-C stops them all
#   make test   set up, then run the test suite (private standalone Redis and Redis Cluster)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8080

.PHONY: setup run run-cluster test test-fast lint loadtest loadtest-queue bench bench-quick bench-workers bench-profile bench-memory bench-inprocess bench-skew cluster clean

$(BIN)/seckill-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,load]'
	@touch $@

setup: $(BIN)/seckill-gateway
	@scripts/ensure-redis.sh

run: setup
	$(BIN)/python -m devtools.stack --port $(PORT)

run-cluster: setup
	$(BIN)/python -m devtools.stack --cluster --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -rs --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

lint: setup
	$(BIN)/ruff check gateway devtools loadtest tests
	$(BIN)/mypy

loadtest: setup
	$(BIN)/python -m loadtest.run

# The waiting room's full run (issue 14; not part of the test suite, about 2 minutes):
# QUEUE_CROWD buyers join before the start, QUEUE_LATE after it, at admit_rate QUEUE_RATE;
# the verifier checks invariant 9 and prints wait percentiles; the picture goes to
# docs/waiting-room.png (and loadtest/reports/waiting-room.png).
QUEUE_CROWD ?= 10000
QUEUE_LATE  ?= 1000
QUEUE_STOCK ?= 10500
QUEUE_RATE  ?= 200
QUEUE_ARGS  ?=
loadtest-queue: setup
	$(BIN)/python -m loadtest.run QueueCrowd --run-time 100s --users 20 --queue-users 20 --queue-lead 25 --gateway-workers 2 \
		--queue-crowd $(QUEUE_CROWD) --queue-late $(QUEUE_LATE) --queue-stock $(QUEUE_STOCK) \
		--queue-rate $(QUEUE_RATE) --queue-picture docs/waiting-room.png $(QUEUE_ARGS)

bench: setup
	$(BIN)/python -m loadtest.bench

bench-quick: setup
	$(BIN)/python -m loadtest.bench --quick

bench-workers: setup
	$(BIN)/python -m loadtest.bench --workers 2 --redis standalone --png loadtest/reports/bench-workers.png

bench-profile: setup
	$(BIN)/python -m loadtest.bench_profile

bench-memory: setup
	$(BIN)/python -m loadtest.bench_memory

bench-inprocess: setup
	$(BIN)/python -m loadtest.bench_inprocess

bench-skew: setup
	$(BIN)/python -m loadtest.bench_skew

cluster: setup
	$(BIN)/python -m devtools.redis_cluster

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis orders.db*

# Chaos run (loadtest/chaos.py): seeded random purchases, unit moves, compensations, sale
# creates and deletes through fault proxies, then every invariant. Runs consecutive seeds
# for CHAOS_DURATION seconds and prints them; replay one with the command it prints,
# `python -m loadtest.chaos --seed N --steps M --redis MODE`. More: CHAOS_ARGS="--seed 100
# --steps 200 --skip reuse --trace".
CHAOS_DURATION ?= 300
CHAOS_REDIS    ?= both
CHAOS_ARGS     ?=
.PHONY: chaos
chaos: setup
	$(BIN)/python -m loadtest.chaos --redis $(CHAOS_REDIS) --duration $(CHAOS_DURATION) $(CHAOS_ARGS)

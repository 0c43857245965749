# Herald — everything installs into .venv; only python3 and make are needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for make test / test-nats / test-system (0: one process). The tests mostly wait
# (on sockets, timers, other processes), so 4 is right on 2 cores; tests/conftest.py gives the soak a
# worker of its own (then its share of the rest) and runs the cluster failovers one at a time.
TEST_WORKERS ?= 4
XDIST = -n $(TEST_WORKERS) --dist loadgroup
# Extra arguments for ops/bench/run.py, e.g. make bench BENCH_ARGS='--quick --only fanout-ws'
BENCH_ARGS ?=
# Length of `make soak` (ops/soak.py: one node under churn and nats-server restarts, fails on drift).
SOAK_MINUTES ?= 30
NCHAN_MODULE ?= /usr/lib/nginx/modules/ngx_nchan_module.so
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM ?= /usr/bin/chromium
# The browser tests drive Debian's chromium; playwright must never fetch a browser build of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: dev test test-fast test-nats test-system lint serve clean install bench bench-peers bench-history bench-publish bench-floor bench-ab bench-deps-nchan browser-deps cluster cluster-stop cluster-deps ops-deps soak fuzz

install: $(STAMP)

# Re-install whenever the package metadata changes.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,speed]'
	@touch $@

dev: $(STAMP)
	$(BIN)/herald dev

serve: $(STAMP)
	$(BIN)/herald serve

# The tiers are folders (README "Tests"): tests/unit (no processes), tests/nats (a real nats-server),
# tests/system (nginx, Prometheus, Chromium, the cluster, the soak, CLIs). make test runs them all;
# make test PYTEST_ARGS='-m "not slow"' leaves out the soak and the cluster failovers.
test: $(STAMP) browser-deps cluster-deps ops-deps
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The unit tier, in one process: seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-nats: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) tests/nats $(PYTEST_ARGS)

test-system: $(STAMP) browser-deps cluster-deps ops-deps
	$(BIN)/python -m pytest $(XDIST) tests/system $(PYTEST_ARGS)

# The fuzzers of tests/{unit,nats}/test_fuzz.py and tests/unit/test_hs256.py with a big budget (make test
# runs them with 100 examples each); inputs/s per property in artifacts/fuzz/stats.json.
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP)
	HERALD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/unit/test_fuzz.py tests/unit/test_hs256.py \
		tests/nats/test_fuzz.py \
		--hypothesis-show-statistics --show-capture=no $(PYTEST_ARGS)

# Herald and the naive aiohttp baseline; results in artifacts/bench/ (see ops/bench/README.md).
bench: $(STAMP)
	$(BIN)/python -m ops.bench.run $(BENCH_ARGS)

# The same plus nginx + nchan, installed with apt-get when missing.
bench-peers: $(STAMP) bench-deps-nchan
	$(BIN)/python -m ops.bench.run --peers $(BENCH_ARGS)

# The cost of one page of history (the history command) on a real nats-server: p50 / p99, node CPU per request.
bench-history: $(STAMP)
	$(BIN)/python -m ops.bench.history $(BENCH_ARGS)

# Node CPU per message through POST /api/publish: single messages, then batches.
bench-publish: $(STAMP)
	$(BIN)/python -m ops.bench.publish $(BENCH_ARGS)

# What minimal Python servers doing only the contract's work cost per publish and per connect here.
bench-floor: $(STAMP)
	$(BIN)/python -m ops.bench.floor $(BENCH_ARGS)

# Two versions served side by side, so that this VM's drift hits both alike: make bench-ab AB='main HEAD'
# (AB='nchan HEAD': nginx + nchan beside a version, for the ratio to nchan)
bench-ab: $(STAMP)
	$(BIN)/python -m ops.bench.ab $(AB) $(BENCH_ARGS)

bench-deps-nchan:
	@if { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && test -e $(NCHAN_MODULE); then :; else \
		echo "installing nginx and libnginx-mod-nchan with apt-get"; \
		$(SUDO) apt-get install -y nginx libnginx-mod-nchan || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y nginx libnginx-mod-nchan; }; \
	fi

# Debian's chromium for the browser tests (tests/browser.py), installed with apt-get when missing.
browser-deps:
	@if test -x $(CHROMIUM); then :; else \
		echo "installing chromium with apt-get"; \
		$(SUDO) apt-get install -y chromium || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }; \
	fi

# A local 3-node NATS cluster + 3 Herald nodes behind nginx (ops/cluster.py; state in .cluster/).
cluster: $(STAMP) cluster-deps
	$(BIN)/python -m ops.cluster start

cluster-stop: $(STAMP)
	$(BIN)/python -m ops.cluster stop

# nginx for the cluster's load balancer (ops/nginx/herald.conf), installed with apt-get when missing.
cluster-deps:
	@if { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1; then :; else \
		echo "installing nginx with apt-get"; \
		$(SUDO) apt-get install -y nginx || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y nginx; }; \
	fi

# Debian's prometheus (with promtool) for the rules/dashboard tests (tests/system/test_ops_prometheus.py), installed when missing.
ops-deps:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; else \
		echo "installing prometheus with apt-get"; \
		$(SUDO) apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends prometheus || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends prometheus; }; \
	fi

# One node soaked for $(SOAK_MINUTES) minutes; CSV, PNG and summary in artifacts/soak/.
soak: $(STAMP)
	$(BIN)/python -m ops.soak --minutes $(SOAK_MINUTES)

lint: $(STAMP)
	$(BIN)/ruff check gateway broker ops tests
	$(BIN)/ruff format --check gateway broker ops tests
	$(BIN)/mypy gateway broker ops

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Herald — everything installs into .venv; only python3 and make are needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: dev test lint serve clean install

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

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway broker tests
	$(BIN)/ruff format --check gateway broker tests
	$(BIN)/mypy gateway broker

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

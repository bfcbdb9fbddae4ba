# hsmproxy — every target installs what it needs first (Debian/Ubuntu).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit deps softhsm emulator clean

## run: start hsmproxy on its embedded defaults (until the proxy lands: the reference emulator)
run: deps softhsm
	$(BIN)/hsmproxy emulator --listen 127.0.0.1:1501 --header-length 4

## test: lint, type-check and run the whole test suite
test: deps softhsm lint typecheck unit

lint: deps
	$(BIN)/ruff check .

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest -q $(PYTEST_ARGS)

deps: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv python3-pip; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

softhsm:
	@command -v softhsm2-util >/dev/null 2>&1 || { \
	  echo "installing SoftHSM2"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq softhsm2; }

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis

# hsmproxy — every target installs what it needs first (Debian/Ubuntu).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

NODES := node-a node-b
# Bump when the LMK ceremony creates different token objects, so ./var is reloaded.
LMK_LAYOUT := 3

.PHONY: run test lint typecheck unit deps softhsm emulator var bench clean

## run: start hsmproxy on its embedded defaults (config.toml: two SoftHSM2 nodes under ./var, audit on)
run: deps softhsm var
	$(BIN)/hsmproxy serve --config config.toml

## emulator: start the reference emulator on 127.0.0.1:1501
emulator: deps
	$(BIN)/hsmproxy emulator --listen 127.0.0.1:1501 --header-length 4

## var: create the dev SoftHSM2 tokens, their PIN files, the test LMKs and the audit signing keys (idempotent)
var: deps softhsm
	@for n in $(NODES); do \
	  mkdir -p var/$$n/tokens; \
	  [ -f var/$$n/softhsm2.conf ] || printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
	    "$(CURDIR)/var/$$n/tokens" > var/$$n/softhsm2.conf; \
	  [ -s var/$$n/pin ] || (umask 077; od -An -N8 -tx1 /dev/urandom | tr -d ' \n' > var/$$n/pin); \
	  if ! SOFTHSM2_CONF=var/$$n/softhsm2.conf softhsm2-util --show-slots | grep -q "Label: *$$n *$$"; then \
	    SOFTHSM2_CONF=var/$$n/softhsm2.conf softhsm2-util --init-token --free --label $$n \
	      --pin "$$(cat var/$$n/pin)" --so-pin "$$(cat var/$$n/pin)" >/dev/null; \
	    rm -f var/.lmk-loaded; \
	  fi; \
	done
	@[ "$$(cat var/.lmk-loaded 2>/dev/null)" = "$(LMK_LAYOUT)" ] || { \
	  $(BIN)/hsmproxy lmk load --all --test --config config.toml && echo "$(LMK_LAYOUT)" > var/.lmk-loaded; }
	@[ -s var/audit/keys.pem ] || $(BIN)/hsmproxy audit keys --generate --config config.toml --out var/audit/keys.pem  # checkpoint signing keys, made in each token, pinned
	@$(BIN)/python -m hsmproxy.iso8583.bench install-keys --config config.toml >/dev/null  # dev ISO route's keys

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

## bench: every BENCHMARKS.md row, echo / emulator / proxy side by side (scripts/benchmarks.sh)
BENCH_SECONDS ?= 8
bench: deps softhsm var
	scripts/benchmarks.sh $(BENCH_SECONDS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis

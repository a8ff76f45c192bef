# Bulkhead: `make run` sets everything up and starts the portal; `make test` sets up and runs every check.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VAR := var
NATIVE_SO := imaging/_native.abi3.so
NATIVE_SRC := $(shell find imaging/native/src -name '*.rs' 2>/dev/null) imaging/native/Cargo.toml
CARGO ?= cargo
PYTEST_ARGS ?=

.PHONY: help setup system venv native js guest run agent test lint typecheck rust-check pytest bench clean lock conformance

help:
	@echo "make run    set up everything and start the portal on http://127.0.0.1:8000"
	@echo "make test   set up everything and run ruff, mypy, cargo checks and the whole test suite"

setup: system venv native js guest

system: $(VAR)/.system-packages
$(VAR)/.system-packages: scripts/system-packages.txt scripts/install-system-packages.sh
	@mkdir -p $(VAR)
	bash scripts/install-system-packages.sh
	@touch $@

# Versions come from requirements.lock.txt only (hashes required); `make lock` refreshes it on purpose.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements.lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $@

lock:
	bash scripts/lock.sh

native: $(NATIVE_SO)
$(NATIVE_SO): $(NATIVE_SRC)
	cd imaging/native && $(CARGO) build --release --locked --quiet
	cp imaging/native/target/release/lib_native.so $(NATIVE_SO).tmp && mv $(NATIVE_SO).tmp $(NATIVE_SO)

js: frontend/static/vendor/.stamp
frontend/static/vendor/.stamp: frontend/package.json frontend/package-lock.json scripts/vendor-js.sh
	bash scripts/vendor-js.sh
	@touch $@

guest: $(VAR)/guest/manifest.json
# The build leaves an unchanged manifest alone: touch it, or every later `make agent` would run the build again.
$(VAR)/guest/manifest.json: $(wildcard compute/guest/*.py compute/guest/*.sh)
	$(PY) -m compute.guest.build --out $(VAR)/guest
	@touch $@

run: setup
	$(PY) -m portal.stack run

# A new host joins headless: `make agent PORTAL=https://portal JOIN_TOKEN=bhj_...` (command copied from the UI).
agent: system venv native guest
	@test -n "$(PORTAL)" -a -n "$(JOIN_TOKEN)" || { echo "usage: make agent PORTAL=<url> JOIN_TOKEN=<token>"; exit 2; }
	$(PY) -m compute.join --portal "$(PORTAL)" --token "$(JOIN_TOKEN)"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy .

rust-check:
	cd imaging/native && $(CARGO) fmt --check && $(CARGO) clippy --release --locked --all-targets --quiet -- -D warnings && $(CARGO) test --release --locked --quiet

pytest: setup conformance
	scripts/with-test-services.sh $(PY) -m pytest $(PYTEST_ARGS)

test: setup conformance lint typecheck rust-check
	scripts/with-test-services.sh $(PY) -m pytest $(PYTEST_ARGS)

# The OCI distribution-spec conformance suite (Go, pinned in tests/conformance/go.sum), for the registry tests.
conformance:
	scripts/build-conformance.sh

bench: setup
	scripts/with-test-services.sh bash bench/run-all.sh

clean:
	rm -rf $(VENV) imaging/native/target $(NATIVE_SO) frontend/node_modules frontend/static/vendor

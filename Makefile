.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(HOME)/.cargo/bin:$(PATH)

LOCK := requirements.lock

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

.PHONY: install
install: $(PY) ## Create .venv with the locked dependencies, the package (Rust core in release mode) and the dev tools
	# The tested versions first (requirements.lock), so a fresh machine gets what CI ran.
	$(PY) -m pip install -q -r $(LOCK)
	# maturin develop writes the module into the source tree; drop a stale one first.
	rm -f prop_stream/_core*.so
	$(VENV)/bin/maturin develop --release --extras dev --quiet
	@test -x $(VENV)/bin/prop-stream

.PHONY: run
run: install ## Run the product: a demo database served with the built-in tick source
	$(VENV)/bin/prop-stream demo

.PHONY: lock
lock: ## Re-resolve pyproject.toml's dependencies into requirements.lock
	scripts/lock-deps

.PHONY: build-dev
build-dev: $(PY) ## Build the Rust core in debug mode into .venv (fast compile, slow engine)
	$(PY) -m pip install -q -r $(LOCK)
	rm -f prop_stream/_core*.so
	$(VENV)/bin/maturin develop --extras dev --quiet

.PHONY: build-prod
build-prod: install ## Build the Rust core in release mode into .venv

.PHONY: format
format: ## Format Python and Rust sources
	$(VENV)/bin/ruff check --fix-only .
	$(VENV)/bin/ruff format .
	cargo fmt --all

.PHONY: lint-python
lint-python: ## ruff, ruff format --check, import-linter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

.PHONY: lint-rust
lint-rust: ## cargo fmt --check and clippy with -D warnings
	cargo fmt --all -- --check
	cargo clippy --all-targets --all-features -- -D warnings

.PHONY: typecheck
typecheck: ## mypy --strict over prop_stream, tests and benchmarks
	$(VENV)/bin/mypy

.PHONY: stubtest
stubtest: ## Check prop_stream/_core.pyi against the built module
	$(VENV)/bin/python -m mypy.stubtest prop_stream._core --mypy-config-file pyproject.toml --allowlist .mypy-stubtest-allowlist

.PHONY: lint
lint: lint-python lint-rust typecheck stubtest ## Every linter: ruff, import-linter, mypy, stubtest, cargo fmt, clippy

.PHONY: test
test: install ## Install, then run cargo test and the whole pytest suite (benchmarks as a smoke run)
	cargo test --workspace
	PROP_STREAM_BENCH_SMOKE=1 $(VENV)/bin/pytest --benchmark-disable

.PHONY: test-integration
test-integration: install ## Only the integration tests
	$(VENV)/bin/pytest -m integration

.PHONY: bench
bench: install ## Benchmarks at full size, release build (results in docs/benchmarks.md)
	$(VENV)/bin/pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

.PHONY: all
all: lint test ## Lint and test

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

# Everyday tasks. `make help` lists them.
.PHONY: help build run test lint fmt check

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build: ## Release build of the coordinator
	cargo build --release --locked

run: ## Run the coordinator on the embedded SQLite in ./data
	cargo run --release --locked

test: ## All tests (needs PostgreSQL on 127.0.0.1:5432)
	cargo test --locked

lint: ## Formatting check and clippy, as CI runs them
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

fmt: ## Format the code
	cargo fmt --all

check: ## Everything CI runs
	bash .ci/run

.PHONY: chart-check image
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
IMAGE ?= appproxy-coordinator:$(VERSION)

chart-check: ## Helm chart checks: lint, render, Kubernetes schemas, values schema, RBAC, the rendered pods run, dashboard vs /metrics (sets up .venv-chart, builds the coordinator)
	bash scripts/chart-check.sh

image: ## Container image (needs a Docker engine): make image IMAGE=registry/appproxy-coordinator:TAG
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

.PHONY: bench
bench: ## Benchmarks against PostgreSQL on 127.0.0.1:5432; writes bench/results.json (see BENCHMARKS.md)
	cargo build --release --locked --bin appproxy-coordinator --example bench
	$${CARGO_TARGET_DIR:-target}/release/examples/bench $(BENCH_ARGS)

.PHONY: fuzz
fuzz: ## Schemathesis (all checks) against a coordinator it starts, with each kind of token; a few minutes
	bash scripts/fuzz.sh

.PHONY: faults
faults: ## Fault tests, including a PostgreSQL restart under load (stops the local server briefly)
	cargo test --locked --test faults -- --include-ignored --test-threads=1

.PHONY: e2e-backendai bench-backendai bench-backendai-resend redis-sentinel
redis-sentinel: ## Installs Redis Sentinel (Debian redis-sentinel) when missing, for scripts/e2e_backendai_sentinel.py
	bash scripts/redis-sentinel.sh

e2e-backendai: ## End to end with the unmodified Backend.AI worker from PyPI (needs Redis on 127.0.0.1:6379, Python 3.13; builds its venv under ~/.cache): the main scenario, then every scripts/e2e_backendai_*.py
	python3 scripts/e2e_backendai.py
	for s in scripts/e2e_backendai_*.py; do [ -e "$$s" ] || continue; python3 "$$s" || exit 1; done

.PHONY: e2e-takeover
e2e-takeover: ## Switch the REAL upstream coordinator 26.9.6 (venv under ~/.cache, built by scripts/backendai-upstream-schema.sh venv) and its running workers to this coordinator (import-backendai) and back (export-backendai), every URL checked; needs PostgreSQL, Redis, Python 3.13; about a minute
	python3 scripts/e2e_takeover.py

bench-backendai: ## Backend.AI measurements through the real worker (the worker's own ceiling, creates at 16 clients with CPU per create, bulk create, route calls/s, create to first 200); writes bench/backendai.json; BENCH_ARGS=--postgres=postgres://postgres@127.0.0.1:5432/postgres for PostgreSQL
	cargo build --release --locked --bin appproxy-coordinator
	APPPROXY_COORDINATOR_BIN=$${CARGO_TARGET_DIR:-target}/release/appproxy-coordinator python3 scripts/e2e_backendai.py --bench $(BENCH_ARGS)

bench-backendai-resend: ## What the Backend.AI anti-entropy sweep costs Redis at 10,000 circuits (a Redis of its own, one sweep period of 60 s); writes bench/backendai-resend.json
	cargo build --release --locked --bin appproxy-coordinator
	APPPROXY_COORDINATOR_BIN=$${CARGO_TARGET_DIR:-target}/release/appproxy-coordinator python3 scripts/bench_backendai_resend.py

.PHONY: e2e-ui ui-screenshots
e2e-ui: ## The status page in a real headless Chromium (installs Debian chromium + chromium-driver when missing, selenium into a venv under ~/.cache)
	python3 scripts/e2e_ui.py

ui-screenshots: ## As e2e-ui, and saves its screenshots as docs/ui.png and docs/ui-phone.png (the README's)
	E2E_UI_SCREENSHOTS=$(CURDIR)/docs python3 scripts/e2e_ui.py

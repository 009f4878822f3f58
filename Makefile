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

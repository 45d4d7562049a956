# The two commands of the README: `make serve` and `make test`. Everything else is a helper.
# Each target first makes sure the patched crates exist (scripts/prepare-patched-crates.sh).
CARGO ?= cargo
ARGS ?=

.PHONY: prepare build serve test check lint bench eval

prepare:
	@./scripts/prepare-patched-crates.sh

build: prepare
	$(CARGO) build --release --locked

serve: prepare
	$(CARGO) run --release --locked --bin mistralrs-logquant -- serve $(ARGS)

# What CI runs (.ci/run) and reviewers check: formatting, clippy with warnings as errors, then
# every test. Release profile for everything: model inference in a debug build is far too slow,
# and one profile means the dependencies are built once.
test: lint
	$(CARGO) test --release --locked -- --test-threads=1

check: prepare
	$(CARGO) check --release --all-targets

lint: prepare
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

# The two commands of the README: `make serve` and `make test`. Everything else is a helper.
# Each target first makes sure the patched crates exist (scripts/prepare-patched-crates.sh).
CARGO ?= cargo
ARGS ?=

.PHONY: prepare build serve test check lint bench eval build-cuda device-check-bundle

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

# Not one of the two commands, and never in CI: a release binary with `--features cuda`, built
# here without a GPU (pinned CUDA 13.0 wheels into target/cuda-toolkit; target/cuda).
build-cuda:
	./scripts/build-cuda.sh

# What scripts/device-check.sh runs on a GPU machine: the CUDA binary and test, bundled.
device-check-bundle: build-cuda
	./scripts/device-check.sh --prepare

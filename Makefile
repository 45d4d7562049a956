# The two commands of the README: `make serve` and `make test`. Everything else is a helper.
# Each target first makes sure the patched crates exist (scripts/prepare-patched-crates.sh).
CARGO ?= cargo
ARGS ?=

.PHONY: prepare build serve test check lint bench eval cuda-check build-cuda device-check-bundle build-ring test-tp figures

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
	$(CARGO) fmt --check --manifest-path patches/ring-collective-check/Cargo.toml
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

# Redraw every figure in docs/figures/ from its JSON in docs/data/ with the binary's `report`
# subcommand (scripts/figures.sh; `scripts/figures.sh --check` compares instead of writing).
figures: build
	./scripts/figures.sh

# Not in CI: `cargo check` and clippy of every target with `--features cuda`, against a fake
# nvcc (no toolkit, nothing runnable; target/cuda-check).
cuda-check: prepare
	./scripts/cuda-typecheck.sh
	./scripts/cuda-typecheck.sh --clippy

# Not one of the two commands, and never in CI: a release binary with `--features cuda`, built
# here without a GPU (pinned CUDA 13.0 wheels into target/cuda-toolkit; target/cuda).
build-cuda:
	./scripts/build-cuda.sh

# What scripts/device-check.sh runs on a GPU machine: the CUDA binary and test, bundled.
device-check-bundle: build-cuda
	./scripts/device-check.sh --prepare

# Not one of the two commands, and not in CI (a second build of mistral.rs and everything above
# it, ~6 min from a warm target/release, ~25 min cold): tensor parallelism across processes with
# mistral.rs's TCP ring backend, built into target/ring (a ring binary cannot run without a
# rank config, so it never replaces the plain one). target/ring starts as a copy of
# target/release when it does not exist, so only the crates the feature changes are rebuilt.
RING_TARGET := target/ring

build-ring: prepare
	@[ -d $(RING_TARGET)/release ] || { [ -d target/release ] && mkdir -p $(RING_TARGET) && cp -a target/release $(RING_TARGET)/; } || true
	CARGO_TARGET_DIR=$(RING_TARGET) $(CARGO) build --release --locked --features ring

# Two ranks on 127.0.0.1 against one plain process (tests/tensor_parallel.rs); the plain binary
# is the oracle, so it is built first.
# First the collective bug on the pristine mistralrs-quant and its fix (scripts/ring-collective-check.sh).
test-tp: build build-ring
	./scripts/ring-collective-check.sh
	MISTRALRS_LOGQUANT_SINGLE_BIN=$(CURDIR)/target/release/mistralrs-logquant \
	CARGO_TARGET_DIR=$(RING_TARGET) $(CARGO) test --release --locked --features ring \
		--test tensor_parallel -- --test-threads=1 --nocapture

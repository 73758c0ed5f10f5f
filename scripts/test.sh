#!/usr/bin/env bash
# The test command: install what is missing, fetch the real test models,
# check formatting and lints, build, run every test (release), then the unit
# tests once more in a debug build so that debug_assert!s run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
models/fetch.sh --all
export HYPURA_REQUIRE_MODELS=1
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace -- --test-threads=1
cargo test --workspace --lib
# The Vulkan tier on Mesa's lavapipe (a CPU Vulkan device): the zero-copy
# direct path against resident runs on the same device. A second build of
# llama.cpp with ggml-vulkan and its shaders (about 15-20 minutes on 2 cores).
bash scripts/setup.sh --vulkan
cargo test --release --features vulkan --test vulkan -- --test-threads=1

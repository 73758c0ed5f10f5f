#!/usr/bin/env bash
# The test command: install what is missing, fetch the real test models,
# build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
models/fetch.sh --all
export HYPURA_REQUIRE_MODELS=1
cargo test --release --workspace -- --test-threads=1

#!/usr/bin/env bash
# The main job end to end: install prerequisites, fetch a real model, build
# Hypura, inspect the model and generate text with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
models/fetch.sh smollm2
cargo build --release
./target/release/hypura inspect models/SmolLM2-135M-Instruct.Q4_1.gguf
./target/release/hypura run models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --prompt "The three most useful things to know about NVMe drives are" \
  --max-tokens 64 --temp 0

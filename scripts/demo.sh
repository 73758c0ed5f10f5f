#!/usr/bin/env bash
# The main job end to end: install prerequisites, fetch a real model, build
# Hypura, inspect the model, generate text with it resident, then again with a
# RAM budget smaller than the model so its FFN layers stream from disk
# (O_DIRECT + io_uring) every token; both runs print their statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
models/fetch.sh smollm2
cargo build --release
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
prompt="The three most useful things to know about NVMe drives are"
./target/release/hypura inspect "$model"
echo
echo "== resident (the whole model in RAM)"
./target/release/hypura run "$model" --prompt "$prompt" --max-tokens 48 --temp 0
echo
echo "== streaming (RAM budget 60 MiB for a 94 MiB model: FFN layers are read from disk every token)"
./target/release/hypura inspect "$model" --ram-budget 60M | sed -n '/placement plan/,$p'
./target/release/hypura run "$model" --prompt "$prompt" --max-tokens 48 --temp 0 --ram-budget 60M

#!/usr/bin/env bash
# What ggml RPC buys and costs, over loopback on this machine (docs/distributed.md):
#  1. Qwen2.5-Coder-1.5B in a 700 MiB memory cgroup (root): alone (streams
#     from disk) against two rpc-servers outside the cgroup holding layers.
#  2. SmolLM2 resident, no cgroup: local against a 3-way split (the hops' cost).
# Rounds alternate so drift hits both sides alike. Needs a release build.
#   bash scripts/rpc-loopback.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
H=target/release/hypura
ROUNDS=${1:-3}
Q=models/qwen2.5-coder-1.5b-q4_k_m.gguf
S=models/SmolLM2-135M-Instruct.Q4_1.gguf
P1=$((40000 + RANDOM % 10000)); P2=$((P1 + 1))
$H rpc-server --port $P1 --device CPU >/dev/null 2>&1 & S1=$!
$H rpc-server --port $P2 --device CPU >/dev/null 2>&1 & S2=$!
trap 'kill $S1 $S2 2>/dev/null || true' EXIT
sleep 1
RPC=127.0.0.1:$P1,127.0.0.1:$P2
$H profile --rpc $RPC
j() { python3 -c "import json,sys; r=[l for l in sys.stdin.read().splitlines() if l.startswith('{')][-1]; r=json.loads(r); print(' '.join(f'{k}={r.get(k)}' for k in sys.argv[1:]))" "$@"; }
C="--temp 0 --no-repack --json --max-tokens 32"
for r in $(seq "$ROUNDS"); do
  echo "== round $r"
  if [ "$(id -u)" = 0 ]; then
    echo "qwen1.5b 700M alone:   $(bash scripts/in-cgroup.sh 700M -- $H run $Q --prompt 'def fib(n):' $C 2>&1 >/dev/null | j mode gen_tps read_bytes_per_token)"
    echo "qwen1.5b 700M +2 rpc:  $(bash scripts/in-cgroup.sh 700M -- $H run $Q --prompt 'def fib(n):' $C --rpc $RPC 2>&1 >/dev/null | j mode gen_tps read_bytes_per_token remote_layers)"
  fi
  echo "smollm2 local:         $($H run $S --prompt 'The quick brown fox' $C 2>&1 >/dev/null | j mode gen_tps)"
  echo "smollm2 1,1,1 split:   $($H run $S --prompt 'The quick brown fox' $C --rpc $RPC --tensor-split 1,1,1 2>&1 >/dev/null | j mode gen_tps remote_layers)"
done

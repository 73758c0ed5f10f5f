#!/usr/bin/env bash
# On the GPU machine: one command that builds libggml-cuda.so into the bundle
# if it is missing (build-cuda.sh), then runs the GPU acceptance tests:
#   1. the bundle sees the CUDA device;
#   2. synthetic llama models (made here with the bundled `hypura gen`), every
#      layer on the GPU: `hypura run --gpu-layers all` gives the same greedy
#      tokens as llama.cpp's CUDA path called directly (`llama_ref`, no Hypura
#      code: argmax of every --logits-out row), and generation tok/s >= 0.98x;
#   3. a partial offload and the CPU-only path give the same tokens too.
# Prints a summary; logs and JSON go to $OUT (or /tmp/hypura-gpu-out).
#
#   bash scripts/gpu/run-tests.sh [BUNDLE_DIR]
# Env: N_TOKENS (128), REPEATS (3), MODELS_DIR (/tmp/hypura-gpu-models).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bundle="$(cd "${1:-$here/../../.gpu-bundle}" && pwd)"
out="${OUT:-/tmp/hypura-gpu-out}"
models="${MODELS_DIR:-/tmp/hypura-gpu-models}"
n="${N_TOKENS:-128}"
repeats="${REPEATS:-3}"
prompt="The history of the city begins with a small settlement on the river"
mkdir -p "$out" "$models"
H="$bundle/hypura"
R="$bundle/llama_ref"
fail=0

bash "$here/build-cuda.sh" "$bundle" 2>&1 | tee "$out/build-cuda.log"
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "FAIL: build-cuda"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Synthetic llama models: SmolLM2-135M's shape, and a 1.1B TinyLlama shape.
gen() { # NAME ARGS...
    local f="$models/$1.gguf"; shift
    [[ -f "$f" ]] || "$H" gen --arch llama --out "$f" "$@" >>"$out/gen.log" 2>&1 || { echo "FAIL: gen $f"; cat "$out/gen.log"; exit 1; }
}
gen smol-shape --layers 30 --embd 576 --ff 1536 --heads 9 --heads-kv 3 --vocab 32000 --type q4_0 --seed 1
gen tinyllama-shape --layers 22 --embd 2048 --ff 5632 --heads 32 --heads-kv 4 --vocab 32000 --type q4_0 --seed 2

json() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d$2)" "$1"; }
# hypura MODEL GPU_LAYERS LOGITS → JSON stats line
hyp() { "$H" run "$1" --prompt "$prompt" -n "$n" --temp 0 --gpu-layers "$2" ${3:+--logits-out "$3"} --json 2>&1 >/dev/null | tail -1; }
# llama_ref MODEL NGL [CHECK] → JSON line
ref() { "$R" "$1" "$prompt" --n "$n" --ngl "$2" ${3:+--check "$3"}; }

echo "== devices (llama_ref, CPU only):"
ref "$models/smol-shape.gguf" 0 | python3 -c "import json,sys; print(json.load(sys.stdin)['devices'])"

for m in smol-shape tinyllama-shape; do
    f="$models/$m.gguf"
    for cfg in "all -1" "8 8" "0 0"; do
        set -- $cfg; hl=$1; rl=$2
        h=$(hyp "$f" "$hl" "$models/$m-$hl.logits")
        r=$(ref "$f" "$rl" "$models/$m-$hl.logits"); rc=$?
        echo "$h" >>"$out/runs.jsonl"; echo "$r" >>"$out/runs.jsonl"
        echo "== $m gpu-layers $hl: hypura $(json "$h" "['gen_tokens']") tokens $(json "$h" "['gen_tps']") tok/s | llama_ref $(json "$r" "['gen_tps']") tok/s | check $(json "$r" "['check']")"
        [[ $rc == 0 ]] || { echo "FAIL: tokens differ ($m, gpu-layers $hl)"; fail=1; }
    done
    # Speed, every layer on the GPU: alternate the two, median of REPEATS each.
    hs=(); rs=()
    for i in $(seq "$repeats"); do
        hs+=("$(json "$(hyp "$f" all)" "['gen_tps']")")  # no --logits-out: as llama_ref
        rs+=("$(json "$(ref "$f" -1)" "['gen_tps']")")
    done
    ratio=$(python3 -c "import statistics as s,sys; h=[float(x) for x in sys.argv[1].split()]; r=[float(x) for x in sys.argv[2].split()]; print(f'{s.median(h)/s.median(r):.4f} (hypura median {s.median(h):.1f} tok/s {h}, llama_ref median {s.median(r):.1f} tok/s {r})')" "${hs[*]}" "${rs[*]}")
    echo "== $m all layers on GPU: tok/s ratio hypura/llama_ref = $ratio"
    python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 0.98 else 1)" "${ratio%% *}" || { echo "FAIL: $m slower than 0.98x"; fail=1; }
done
rm -f "$models"/*.logits
[[ $fail == 0 ]] && echo "ALL GPU TESTS PASSED" || echo "SOME GPU TESTS FAILED"
exit $fail

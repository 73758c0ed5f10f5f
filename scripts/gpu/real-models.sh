#!/usr/bin/env bash
# On the GPU machine: real GGUF models (carried over in pieces, see
# docs/gpu.md), every layer on the GPU: `hypura run` (its plan puts a model
# that fits the GPU budget wholly there) against llama.cpp's CUDA path called
# directly (`llama_ref --ngl -1`): the same greedy tokens (argmax of every
# logits row, and max |diff|), and generation tok/s, median of REPEATS
# alternating runs of N_TOKENS.
#
# A call carries at most 64 MiB: split each model here (`split -n 4 -d
# models/gemma-3-270m-q4_k_m.gguf .m3/gem.` etc., one ignored folder per
# piece), carry the pieces in back-to-back calls that append them to /tmp on
# the warm machine, `cat` them together and check sha256 against
# models/fetch.sh before running this.
#
#   bash scripts/gpu/real-models.sh BUNDLE_DIR MODEL.gguf...
# Env: N_TOKENS (128), REPEATS (7).
set -uo pipefail
bundle="$(cd "$1" && pwd)"; shift
H="$bundle/hypura"; R="$bundle/llama_ref"
n="${N_TOKENS:-128}"; repeats="${REPEATS:-7}"
prompt="The history of the city begins with a small settlement on the river"
fail=0
json() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d$2)" "$1" 2>/dev/null || echo "?"; }
for f in "$@"; do
    lg="/tmp/$(basename "$f").logits"
    h=$("$H" run "$f" --prompt "$prompt" -n "$n" --temp 0 --logits-out "$lg" --json 2>&1 >/dev/null | tail -1)
    r=$("$R" "$f" "$prompt" --n "$n" --ngl -1 --check "$lg"); rc=$?
    echo "== $(basename "$f"): hypura mode $(json "$h" "['mode']") on $(json "$h" "['gpu_device']"), $(json "$h" "['gen_tokens']") tokens | check $(json "$r" "['check']")"
    [[ $rc == 0 ]] || { echo "FAIL: tokens differ ($f)"; fail=1; }
    hs=(); rs=()
    for i in $(seq "$repeats"); do
        hs+=("$(json "$("$H" run "$f" --prompt "$prompt" -n "$n" --temp 0 --json 2>&1 >/dev/null | tail -1)" "['gen_tps']")")
        rs+=("$(json "$("$R" "$f" "$prompt" --n "$n" --ngl -1)" "['gen_tps']")")
    done
    python3 - "$(basename "$f")" "${hs[*]}" "${rs[*]}" <<'PY' || fail=1
import statistics as st, sys
h = [float(x) for x in sys.argv[2].split()]; r = [float(x) for x in sys.argv[3].split()]
ratio = st.median(h) / st.median(r)
print(f"== {sys.argv[1]}: gen tok/s hypura median {st.median(h):.1f} {h} | llama_ref median {st.median(r):.1f} {r} | ratio {ratio:.3f}")
sys.exit(0 if ratio >= 0.98 else 1)
PY
done
[[ $fail == 0 ]] && echo "REAL MODELS PASSED" || echo "SOME REAL MODEL CHECKS FAILED"
exit $fail

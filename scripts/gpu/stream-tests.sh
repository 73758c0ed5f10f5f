#!/usr/bin/env bash
# On the GPU machine: the streaming acceptance test of the GPU tier.
#
#   bash scripts/gpu/stream-tests.sh [BUNDLE_DIR]
#
# Generates (with the bundled `hypura gen`) a synthetic qwen3moe of >= 8 GB and
# a synthetic dense llama, then for each, with --gpu-budget a quarter of the
# model:
#   1. logits: the GPU streaming mode (gpu-experts / gpu-dense) against the
#      model resident on the GPU (same compute placement: byte-identical
#      expected), and the CPU shape (experts / dense on the CPU, attention on
#      the GPU) against it (different kernels: max |diff| reported);
#   2. speed, alternating, page cache dropped before every run (and inside a
#      memory cgroup of MEM_LIMIT when the machine allows one): Hypura's GPU
#      streaming, Hypura's CPU shape, and llama.cpp (llama_ref: every layer on
#      the GPU with --n-cpu-moe for the MoE, as many layers as fit for the
#      dense model), against the ceiling min(disk, host->device) / bytes read
#      per token.
# Builds libggml-cuda.so first if the bundle lacks it. Logs and JSON to $OUT.
# Env: N_TOKENS (32), REPEATS (2), MODELS_DIR (/tmp/hypura-gpu-models), KINDS ("moe dense"),
#      RUN_TIMEOUT (240 s a run),
#      MEM_LIMIT (e.g. 6G; unset: no cgroup), MOE_SIZE (8500M), DENSE_SIZE (6G).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bundle="$(cd "${1:-$root/.gpu-bundle}" && pwd)"
out="${OUT:-/tmp/hypura-gpu-out}"
models="${MODELS_DIR:-/tmp/hypura-gpu-models}"
n="${N_TOKENS:-32}"
repeats="${REPEATS:-2}"
prompt="The history of the city begins with a small settlement on the river"
mkdir -p "$out" "$models"
H="$bundle/hypura"
R="$bundle/llama_ref"
fail=0

bash "$here/build-cuda.sh" "$bundle" >"$out/build-cuda.log" 2>&1 || { cat "$out/build-cuda.log"; echo "FAIL: build-cuda"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader || true

# Measure the machine once (disk O_DIRECT, host->device bandwidth): the plan
# and the ceiling use it.
"$H" profile --force --quick --path "$models" --json >"$out/profile.json" 2>"$out/profile.log" || { tail -5 "$out/profile.log"; echo "FAIL: profile"; fail=1; }
python3 - "$out/profile.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
g = [x for x in p.get("gpus", []) if x.get("kind") == "gpu"]
print(f"== profile: disk best {p['storage']['best_seq_gbps']:.2f} GB/s (O_DIRECT, {p['storage']['backend']}), memory read {p['memory']['read_gbps']:.1f} GB/s")
for x in g:
    print(f"== profile: {x['name']}: free {x['free_bytes']/2**30:.1f} GiB, h2d pinned {x.get('h2d_pinned_gbps')} GB/s, pageable {x.get('h2d_pageable_gbps')} GB/s")
EOF

gen() { # NAME ARGS...
    local f="$models/$1.gguf"; shift
    [[ -f "$f" ]] || "$H" gen --out "$f" "$@" >>"$out/gen.log" 2>&1 || { echo "FAIL: gen $f"; tail -3 "$out/gen.log"; exit 1; }
}
[[ " ${KINDS:-moe dense} " == *" moe "* ]] && gen moe --arch qwen3moe --target-size "${MOE_SIZE:-8500M}" --embd 2048 --heads 32 --heads-kv 4 --experts 128 --experts-used 8 --ff-exp 768 --vocab 32000 --type q4_0 --seed 21
[[ " ${KINDS:-moe dense} " == *" dense "* ]] && gen dense --arch llama --target-size "${DENSE_SIZE:-6G}" --embd 4096 --ff 28672 --heads 32 --heads-kv 8 --vocab 32000 --type q4_0 --seed 22
ls -l "$models"/*.gguf

cg=()
if [[ -n "${MEM_LIMIT:-}" ]]; then
    if bash "$root/scripts/in-cgroup.sh" "$MEM_LIMIT" -- true >/dev/null 2>&1; then
        cg=(bash "$root/scripts/in-cgroup.sh" "$MEM_LIMIT" --)
        echo "== memory cgroup: $MEM_LIMIT for every run"
    else
        echo "== memory cgroup: not available here; page cache dropped before each run instead"
    fi
fi
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
json() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d$2)" "$1" 2>/dev/null || echo "?"; }
# hyp MODEL LOGITS ARGS... → JSON line (stats)
to="${RUN_TIMEOUT:-240}"
hyp() { local m="$1" lg="$2"; shift 2; drop; timeout "$to" "${cg[@]}" "$H" run "$m" --prompt "$prompt" -n "$n" --temp 0 ${lg:+--logits-out "$lg"} --json "$@" 2>"$out/last.err" >/dev/null; tail -1 "$out/last.err"; }
ref() { drop; timeout "$to" "${cg[@]}" "$R" "$@"; }
cmp_logits() { # A B → "identical" or max |diff| and first argmax mismatch
    python3 - "$1" "$2" <<'EOF'
import struct, sys
def rows(p):
    b = open(p, "rb").read()
    assert b[:8] == b"HYPLOGIT", p
    v, n = struct.unpack_from("<IQ", b, 12)
    return v, [struct.unpack_from(f"<{v}f", b, 24 + 4 * v * i) for i in range(n)]
(va, a), (vb, b) = rows(sys.argv[1]), rows(sys.argv[2])
if open(sys.argv[1], "rb").read() == open(sys.argv[2], "rb").read():
    print("identical"); sys.exit(0)
n = min(len(a), len(b))
mx = max((abs(x - y) for i in range(n) for x, y in zip(a[i], b[i])), default=0.0)
am = lambda r: max(range(len(r)), key=r.__getitem__)
mism = next((i for i in range(n) if am(a[i]) != am(b[i])), None)
print(f"max|diff| {mx:.3g} over {n} rows, first argmax mismatch: {mism}")
sys.exit(1)
EOF
}

for kind in ${KINDS:-moe dense}; do
    f="$models/$kind.gguf"
    size=$(stat -c %s "$f")
    q=$(( size / 4 ))
    if [[ $kind == moe ]]; then gm=gpu-experts; cm=experts; else gm=gpu-dense; cm=dense; fi
    # The plan for the quarter budget (how many layers' experts fit: llama.cpp's side gets the same).
    # Inside the cgroup too: the RAM budget is read from it.
    "${cg[@]}" "$H" inspect "$f" --gpu-budget "$q" --mode "$gm" --json >"$out/$kind-plan.json" 2>>"$out/inspect.err"
    slots=$(python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['plan']; print(p['gpu']['n_slots'], len(p['streamed_layers']), len(p['pinned_layers']), p['bytes_per_token'], p.get('ceiling_tps'))" "$out/$kind-plan.json" 2>/dev/null || echo "? ? ? ? ?")
    read -r n_slots n_layers n_pinned bpt ceil <<<"$slots"
    echo "== $kind: $(( size >> 20 )) MiB, GPU budget $(( q >> 20 )) MiB: plan $gm slots $n_slots, streamed layers $n_layers, pinned $n_pinned, bytes/token $bpt, ceiling $ceil tok/s"

    auto=$("${cg[@]}" "$H" inspect "$f" --gpu-budget "$q" --json 2>/dev/null | python3 -c "import json,sys; p=json.load(sys.stdin)['plan']; print(p['mode'], 'predicted', p.get('predicted_tps'))" 2>/dev/null)
    echo "   auto plan at this budget: $auto"
    # 1. Logits.
    r=$(hyp "$f" "$models/$kind-res.lg" --mode resident)
    echo "   resident on GPU: $(json "$r" "['gen_tps']") tok/s"
    s=$(hyp "$f" "$models/$kind-gpu.lg" --mode "$gm" --gpu-budget "$q")
    ceil=$(json "$s" "['ceiling_tps']")
    echo "   $gm: $(json "$s" "['gen_tps']") tok/s (ceiling $ceil), read $(json "$s" "['read_bytes_per_token']") B/token, copied $(json "$s" "['upload_bytes_per_token']") B/token, stall $(json "$s" "['stall_ms_per_token']") ms/token"
    c=$(hyp "$f" "$models/$kind-cpu.lg" --mode "$cm" --gpu-budget "$q")
    echo "   $cm (CPU shape): $(json "$c" "['gen_tps']") tok/s"
    echo "$r" >>"$out/runs.jsonl"; echo "$s" >>"$out/runs.jsonl"; echo "$c" >>"$out/runs.jsonl"
    # Resident on the GPU with its compute cut into the ranges streaming
    # uses (kernel fusion stops at a cut): the same compute as $gm.
    cuts=${gm#gpu-}
    rc_=$(hyp "$f" "$models/$kind-cuts.lg" --mode resident --reference-cuts "$cuts")
    echo "   resident on GPU, cut like $gm: $(json "$rc_" "['gen_tps']") tok/s"
    echo "   logits $gm vs resident GPU: $(cmp_logits "$models/$kind-res.lg" "$models/$kind-gpu.lg")"
    res=$(cmp_logits "$models/$kind-cuts.lg" "$models/$kind-gpu.lg"); rc=$?
    echo "   logits $gm vs resident GPU cut the same way: $res"
    [[ $rc == 0 ]] || { echo "FAIL: $kind $gm logits differ from resident with the same cuts"; fail=1; }
    echo "   logits $cm vs resident GPU: $(cmp_logits "$models/$kind-res.lg" "$models/$kind-cpu.lg") (FFN on the CPU: other kernels)"

    # 2. Speed, alternating.
    if [[ $kind == moe ]]; then
        ncm=$(( n_layers - n_slots )); (( ncm < 0 )) && ncm=0
        refargs=(--ngl -1 --n-cpu-moe "$ncm"); reflabel="llama.cpp -ngl all --n-cpu-moe $ncm"
    else
        # As many layers as fit the budget: layer bytes ~ (size - base) / layers.
        ngl=$(python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['plan']; L=len(p['streamed_layers'])+len(p['pinned_layers']); print(max(0, int(int(sys.argv[2]) / (p['model_bytes'] / L)) - 1))" "$out/$kind-plan.json" "$q" 2>/dev/null || echo 0)
        refargs=(--ngl "$ngl"); reflabel="llama.cpp -ngl $ngl"
    fi
    gs=(); cs=(); rs=()
    for i in $(seq "$repeats"); do
        gs+=("$(json "$(hyp "$f" "" --mode "$gm" --gpu-budget "$q")" "['gen_tps']")")
        cs+=("$(json "$(hyp "$f" "" --mode "$cm" --gpu-budget "$q")" "['gen_tps']")")
        rj=$(ref "$f" "$prompt" --n "$n" "${refargs[@]}"); echo "$rj" >>"$out/runs.jsonl"
        rs+=("$(json "$rj" "['gen_tps']")")
    done
    python3 - "$kind" "$gm" "$cm" "$reflabel" "${gs[*]}" "${cs[*]}" "${rs[*]}" "$ceil" <<'EOF'
import statistics as st, sys
kind, gm, cm, rl = sys.argv[1:5]
num = lambda s: [float(x) for x in s.split() if x not in ("?", "")]
g, c, r = num(sys.argv[5]), num(sys.argv[6]), num(sys.argv[7])
ceil = float(sys.argv[8]) if sys.argv[8] not in ("None", "?") else None
med = lambda v: st.median(v) if v else float("nan")
print(f"   speed (median of {len(g)}; tok/s): {gm} {med(g):.2f} {g} | {cm} {med(c):.2f} {c} | {rl} {med(r):.2f} {r}")
print(f"   ratios: {gm}/llama.cpp {med(g)/med(r):.2f}x, {cm}/llama.cpp {med(c)/med(r):.2f}x" + (f", {gm}/ceiling {med(g)/ceil:.2f}" if ceil else ""))
EOF
done
rm -f "$models"/*.lg
[[ $fail == 0 ]] && echo "STREAM TESTS PASSED" || echo "SOME STREAM TESTS FAILED"
exit $fail

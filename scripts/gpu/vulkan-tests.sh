#!/usr/bin/env bash
# The Vulkan tier on the lent GPU machine (NVIDIA's Vulkan ICD, no loader
# installed there): correctness of the direct (zero-copy) path against a
# resident run with the same cuts, then speed against llama.cpp's own Vulkan
# path (resident, and -ngl partial) in a memory cgroup, then the default
# budget under a cgroup v2 limit (that machine has v2; ours has v1).
#
#   run(command="bash scripts/gpu/vulkan-tests.sh", carry=[".gl", ".dev"])
#
# .gl: Debian 12's libvulkan1 + glvnd .debs (see the device tool's README);
# .dev/hypura: `RUSTFLAGS="-C target-cpu=x86-64-v3" cargo build --release
# --features vulkan`, stripped. Results go to $OUT/vulkan.log.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
H=$PWD/.dev/hypura
chmod +x "$H"
LOG=${OUT:-/tmp}/vulkan.log
W=/tmp/vk; mkdir -p $W
exec > >(tee "$LOG") 2>&1
say() { echo "== $*"; }
j() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(' '.join(f'{k}={r.get(k)}' for k in sys.argv[1:]))" "$@"; }
nproc; free -g | head -2; stat -fc %T /sys/fs/cgroup
say models
$H gen --out $W/dense.gguf --arch llama --target-size 2G --type q8_0 --seed 7 --force
$H gen --out $W/moe.gguf --arch qwen3moe --experts 64 --experts-used 8 --target-size 3G \
  --type q4_0 --routing zipf:0.8 --seed 8 --force
$H gen --out $W/small-moe.gguf --arch qwen3moe --layers 6 --embd 320 --experts 16 \
  --experts-used 4 --ff-exp 256 --type q4_0 --routing zipf:0.5 --seed 5 --force
C="--prompt Hello --temp 0 --threads 8 --no-repack --json"
$H inspect $W/dense.gguf 2>&1 | sed -n '/placement plan/,$p'
$H inspect $W/moe.gguf --gpu-budget 1G 2>&1 | sed -n '/placement plan/,$p'

say "correctness: direct (zero-copy) vs resident with the same cuts, NVIDIA Vulkan"
for case in "dense.gguf dense gpu-dense 1G 16" "small-moe.gguf experts gpu-experts 5M 16" \
            "small-moe.gguf experts gpu-experts 64M 16" "moe.gguf experts gpu-experts 1G 8"; do
  set -- $case
  $H run $W/$1 $C --max-tokens $5 --mode resident --reference-cuts $2 --logits-out $W/ref.logits 2>$W/ref.err >/dev/null
  tail -1 $W/ref.err | j mode gpu_device gen_tps
  $H run $W/$1 $C --max-tokens $5 --mode $3 --gpu-upload direct --gpu-budget $4 --logits-out $W/dir.logits 2>$W/dir.err >/dev/null
  tail -1 $W/dir.err | j mode gpu_device gen_tps read_bytes_per_token upload_bytes_per_token expert_hit_rate
  if cmp -s $W/ref.logits $W/dir.logits; then echo "IDENTICAL $*"; else echo "DIFFERENT $*"; grep -v '^{' $W/dir.err | tail -3; fi
done

say "speed in a 1.5G memory cgroup, 32 tokens, alternating 2 rounds (gen tok/s)"
for r in 1 2; do
  for m in dense moe; do
    PEAK=1 bash scripts/in-cgroup.sh 1536M -- $H run $W/$m.gguf $C --max-tokens 32 --mode resident --load-mode mmap 2>$W/a.err >/dev/null
    echo "$m llama.cpp-vulkan-resident: $(tail -2 $W/a.err | head -1 | j gen_tps gpu_resident_bytes) $(tail -1 $W/a.err)"
    PEAK=1 bash scripts/in-cgroup.sh 1536M -- $H run $W/$m.gguf $C --max-tokens 32 --mode resident --load-mode mmap --gpu-layers 6 2>$W/b.err >/dev/null
    echo "$m llama.cpp-vulkan-ngl6: $(tail -2 $W/b.err | head -1 | j gen_tps gpu_resident_bytes) $(tail -1 $W/b.err)"
    for up in direct staged; do
      PEAK=1 bash scripts/in-cgroup.sh 1536M -- $H run $W/$m.gguf $C --max-tokens 32 --gpu-budget 1G --gpu-upload $up 2>$W/c.err >/dev/null
      echo "$m hypura-$up-gpu1G: $(tail -2 $W/c.err | head -1 | j mode gen_tps read_bytes_per_token upload_bytes_per_token expert_hit_rate) $(tail -1 $W/c.err)"
    done
  done
done

say "cgroup v2: CPU only, no flags, 2G dense and 3G MoE in 1G"
for m in dense moe; do
  PEAK=1 bash scripts/in-cgroup.sh 1G -- $H run $W/$m.gguf --prompt Hello --temp 0 --max-tokens 8 --json --gpu-budget 0 2>$W/d.err >/dev/null
  echo "$m v2: rc=$? $(grep -v '^{' $W/d.err | grep -i 'note\|error' | head -2) $(tail -2 $W/d.err | head -1 | j mode ram_budget_bytes peak_rss_bytes gen_tps) $(tail -1 $W/d.err)"
done
say done

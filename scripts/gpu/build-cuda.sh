#!/usr/bin/env bash
# On the GPU machine (CUDA toolkit, cmake, ninja; no Rust needed): builds only
# libggml-cuda.so from the vendored ggml in the bundle and puts it next to the
# hypura binary, where ggml_backend_load_all() finds it. See docs/gpu.md.
#
#   scripts/gpu/build-cuda.sh [BUNDLE_DIR]     (default .gpu-bundle)
# Env: CUDA_ARCHS (default 90-real: H100/H200), JOBS (default nproc),
#      BUILD_DIR (default /tmp/hypura-ggml-cuda), FORCE=1 rebuilds.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bundle="$(cd "${1:-$here/../../.gpu-bundle}" && pwd)"
archs="${CUDA_ARCHS:-90-real}"
jobs="${JOBS:-$(nproc)}"
build="${BUILD_DIR:-/tmp/hypura-ggml-cuda}"

if [[ -f "$bundle/libggml-cuda.so" && "${FORCE:-0}" != 1 ]]; then
    echo "build-cuda: $bundle/libggml-cuda.so exists (FORCE=1 to rebuild)"
    exit 0
fi
[[ -f "$bundle/ggml/CMakeLists.txt" ]] || { echo "build-cuda: no $bundle/ggml: run scripts/gpu/build-host.sh on the build machine" >&2; exit 1; }
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)

t0=$(date +%s)
cmake -S "$here" -B "$build" "${gen[@]}" \
    -DGGML_SRC="$bundle/ggml" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DGGML_CPU=OFF -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF \
    -DCMAKE_CUDA_ARCHITECTURES="$archs" >"$build.configure.log" 2>&1 \
    || { tail -40 "$build.configure.log"; exit 1; }
cmake --build "$build" --target ggml-cuda -j "$jobs" 2>&1 | grep -Ev '^\[[0-9]+/[0-9]+\] Building' || true
lib="$(find "$build" -name 'libggml-cuda.so' -print -quit)"
[[ -n "$lib" ]] || { echo "build-cuda: libggml-cuda.so was not built" >&2; exit 1; }
cp "$lib" "$bundle/libggml-cuda.so"
strip --strip-unneeded "$bundle/libggml-cuda.so" 2>/dev/null || true
echo "build-cuda: $bundle/libggml-cuda.so ($(du -h "$bundle/libggml-cuda.so" | cut -f1)) in $(( $(date +%s) - t0 )) s, archs $archs"

#!/usr/bin/env bash
# On the build machine (Rust, cmake; no CUDA needed): builds Hypura with ggml's
# backends as loadable libraries (GGML_BACKEND_DL, every x86-64 CPU variant) in
# its own target dir (target-gpu/, so target/ is untouched), and gathers a
# runnable folder .gpu-bundle/: hypura and llama_ref (rpath $ORIGIN), the
# shared libraries they need, the CPU variants, and the ggml source that
# build-cuda.sh compiles libggml-cuda.so from on the GPU machine.
# See docs/gpu.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="$root/target-gpu"
bundle="${BUNDLE:-$root/.gpu-bundle}"
# The sapphirerapids variant (AMX) has died with SIGILL on the GPU machine:
# ggml scores it highest there but the AMX tiles are not usable in that VM.
skip_variants="${SKIP_VARIANTS:-sapphirerapids}"

command -v patchelf >/dev/null || { echo "build-host: patchelf is needed (apt-get install patchelf)" >&2; exit 1; }

# CPU_VARIANTS=all (default): every x86-64 CPU variant as its own library,
# ggml picks the best one at run time (GGML_CPU_ALL_VARIANTS; about 14 copies
# of ggml-cpu to compile: 40+ minutes on 2 cores). CPU_VARIANTS=haswell: one
# libggml-cpu.so for AVX2/FMA/F16C/BMI2 machines (any current GPU host), much
# quicker to build.
case "${CPU_VARIANTS:-all}" in
    all) cpu_env=(GGML_CPU_ALL_VARIANTS=ON) ;;
    haswell) cpu_env=(GGML_CPU_ALL_VARIANTS=OFF GGML_SSE42=ON GGML_AVX=ON GGML_AVX2=ON GGML_FMA=ON GGML_F16C=ON GGML_BMI2=ON) ;;
    *) echo "build-host: CPU_VARIANTS must be all or haswell" >&2; exit 1 ;;
esac
# Switching CPU_VARIANTS needs a fresh CMake configure of llama-cpp-sys-2.
stamp="$CARGO_TARGET_DIR/.cpu-variants"
if [[ -f "$stamp" && "$(cat "$stamp")" != "${CPU_VARIANTS:-all}" ]]; then
    rm -rf "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out
fi
mkdir -p "$CARGO_TARGET_DIR"; echo "${CPU_VARIANTS:-all}" >"$stamp"

# llama-cpp-sys-2 hard-links its libraries into target-gpu/release and fails
# on links left from an earlier configuration.
rm -f "$CARGO_TARGET_DIR"/release/lib{llama,ggml}*.so* "$CARGO_TARGET_DIR"/release/{deps,examples}/lib{llama,ggml}*.so*
# The bundle runs on another machine: portable Rust code (the repository's
# default is target-cpu=native, see .cargo/config.toml).
env RUSTFLAGS="${RUSTFLAGS:--C target-cpu=x86-64-v3}" GGML_NATIVE=OFF GGML_BACKEND_DL=ON "${cpu_env[@]}" \
    cargo build --release --features dynamic-backends --bin hypura --example llama_ref

out="$(ls -td "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt 2>/dev/null | head -1)"
[[ -n "$out" ]] || { echo "build-host: no llama-cpp-sys-2 build under $CARGO_TARGET_DIR" >&2; exit 1; }
out="$(dirname "$(dirname "$out")")"

rm -rf "$bundle"
mkdir -p "$bundle"
cp "$CARGO_TARGET_DIR/release/hypura" "$CARGO_TARGET_DIR/release/examples/llama_ref" "$bundle/"
# libllama / libggml / libggml-base with their soname links (cp -a keeps links).
for f in "$out"/lib/lib*.so* "$out"/lib64/lib*.so*; do
    [[ -e "$f" ]] && cp -a "$f" "$bundle/"
done
for f in "$out"/bin/libggml-*.so "$out"/build/bin/libggml-*.so; do
    [[ -e "$f" ]] || continue
    base="$(basename "$f")"
    skip=0
    for v in $skip_variants; do [[ "$base" == *"-$v.so" ]] && skip=1; done
    (( skip )) && { echo "build-host: leaving out $base"; continue; }
    cp "$f" "$bundle/"
done
for f in "$bundle"/*; do
    [[ -L "$f" || ! -f "$f" ]] && continue
    strip --strip-unneeded "$f"
    patchelf --set-rpath '$ORIGIN' "$f"
done

# Every library the executables need must be in the bundle or the system.
missing="$(cd "$bundle" && LD_LIBRARY_PATH= ldd ./hypura ./llama_ref | grep 'not found' || true)"
[[ -z "$missing" ]] || { echo "build-host: unresolved libraries: $missing" >&2; exit 1; }

# The vendored ggml source (what CMake needs to build ggml-base + ggml-cuda).
ggml="$(sed -n 's/^ggml_SOURCE_DIR:STATIC=//p' "$out/build/CMakeCache.txt")"
[[ -f "$ggml/CMakeLists.txt" ]] || { echo "build-host: ggml source not found ($ggml)" >&2; exit 1; }
mkdir -p "$bundle/ggml/src"
cp -a "$ggml/CMakeLists.txt" "$ggml/cmake" "$ggml/include" "$bundle/ggml/"
find "$ggml/src" -maxdepth 1 -type f -exec cp -a {} "$bundle/ggml/src/" \;
cp -a "$ggml/src/ggml-cuda" "$ggml/src/ggml-cpu" "$bundle/ggml/src/"  # ggml-base includes ggml-cpu headers

echo "build-host: $bundle"
ls -la "$bundle"
du -sh "$bundle"

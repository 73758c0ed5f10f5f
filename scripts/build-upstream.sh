#!/usr/bin/env bash
# Builds upstream llama.cpp's llama-bench against the llama.cpp source that
# llama-cpp-sys-2 =0.1.161 vendors (the same ggml and llama Hypura links),
# natively (GGML_NATIVE=ON with AMX off, as Hypura's default build), for the
# side-by-side kernel measurement (scripts/bench-kernels.py). The crate ships
# llama.cpp without tools/, so llama-bench's two source files come from the
# llama-cpp-python sdist on PyPI (LLAMA_CPP_PYTHON, default 0.3.36), whose
# vendored llama.cpp is of the same generation; everything it links is the
# crate's. Prints the directory that holds llama-bench.
#   OUT=DIR (default target/upstream)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/target/upstream}"
ver="${LLAMA_CPP_PYTHON:-0.3.36}"
crate() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp 2>/dev/null | head -1; }
src="$(crate)"
[[ -n "$src" ]] || { (cd "$root" && cargo fetch >/dev/null); src="$(crate)"; }
mkdir -p "$out"
tree="$out/llama.cpp"
if [[ ! -f "$tree/tools/llama-bench/llama-bench.cpp" ]]; then
    rm -rf "$tree" "$out/sdist"
    cp -a "$src" "$tree"
    mkdir -p "$out/sdist"
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$out/sdist" "llama-cpp-python==$ver" >&2
    tar xzf "$out/sdist"/llama_cpp_python-*.tar.gz -C "$out/sdist" --wildcards '*/vendor/llama.cpp/tools/llama-bench/*'
    cp "$out/sdist"/llama_cpp_python-*/vendor/llama.cpp/tools/llama-bench/*.cpp \
       "$out/sdist"/llama_cpp_python-*/vendor/llama.cpp/tools/llama-bench/CMakeLists.txt "$tree/tools/llama-bench/"
    printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' >"$tree/tools/CMakeLists.txt"
fi
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$tree" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$out/build" --target llama-bench -j "$(nproc)" >&2
echo "$out/build/bin"

#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build Hypura:
# a C/C++ toolchain, cmake and libclang (llama.cpp's build and bindgen),
# Python with pip (the model fetch step) and Rust (if cargo is missing).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v cc >/dev/null || need+=(build-essential)
command -v c++ >/dev/null || need+=(g++)
command -v git >/dev/null || need+=(git)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3 python3-pip)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# The server's client tests make a venv (Debian's python3 needs python3-venv for it).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
# bindgen loads libclang.so / libclang-N.so(.M) (never libclang-cpp.so, which
# an unrelated package may have installed).
ldconfig -p 2>/dev/null | grep -qE '(^|[[:space:]/])libclang(-[0-9][0-9.]*)?\.so' || need+=(libclang-dev clang)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then :; else
    echo "setup: installing Rust (rustup)"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
  fi
fi
echo "setup: ok"

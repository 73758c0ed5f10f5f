#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build Hypura:
# a C/C++ toolchain, cmake and libclang (llama.cpp's build and bindgen),
# Python with pip (the model fetch step) and Rust (if cargo is missing).
#
# --vulkan: also what `cargo build --release --features vulkan` needs (the
# Vulkan loader and its link library, glslc and SPIR-V headers for ggml's
# shaders, Mesa's lavapipe CPU Vulkan device for the tests) and Vulkan
# headers new enough for ggml-vulkan (VK_EXT_layer_settings, 1.3.261+):
# where the system's are older (Debian 12 ships 1.3.239), Debian 13's
# libvulkan-dev 1.4.309 headers are unpacked into /usr/local/include, which
# compilers and CMake search before /usr/include (no environment to set).
set -euo pipefail
vulkan=0
for a in "$@"; do
  case "$a" in
    --vulkan) vulkan=1 ;;
    *) echo "setup: unknown option '$a' (known: --vulkan)" >&2; exit 2 ;;
  esac
done
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
if [ $vulkan = 1 ]; then
  command -v glslc >/dev/null || need+=(glslc)
  [ -e /usr/include/spirv/unified1/spirv.hpp ] || [ -e /usr/local/include/spirv/unified1/spirv.hpp ] || need+=(spirv-headers)
  # The link library (libvulkan.so) and the loader (libvulkan.so.1).
  ldconfig -p 2>/dev/null | grep -qE '[[:space:]/]libvulkan\.so([[:space:]]|$)' || need+=(libvulkan-dev)
  ldconfig -p 2>/dev/null | grep -qE '[[:space:]/]libvulkan\.so\.1([[:space:]]|$)' || need+=(libvulkan1)
  # lavapipe (Mesa's CPU Vulkan device): its ICD manifest.
  ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
fi
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
vulkan_headers_ok() {
  local h
  for h in "${VULKAN_SDK:+$VULKAN_SDK/include/vulkan/vulkan_core.h}" /usr/local/include/vulkan/vulkan_core.h /usr/include/vulkan/vulkan_core.h; do
    [ -n "$h" ] && [ -e "$h" ] || continue
    # The first one found is the one the build uses.
    grep -q VK_EXT_layer_settings "$h" && [ -e "$(dirname "$h")/vulkan.hpp" ]
    return
  done
  return 1
}
if [ $vulkan = 1 ] && ! vulkan_headers_ok; then
  arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
  case "$arch" in
    amd64) sum=8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a ;;
    arm64) sum=3244f0422d3c5cf14f5d13bc48a0cae7786d94ea0ceff22414c094388666e70d ;;
    *) echo "setup: no pinned Vulkan headers for $arch: install Vulkan headers >= 1.3.261 (or set VULKAN_SDK)" >&2; exit 1 ;;
  esac
  deb="libvulkan-dev_1.4.309.0-1_${arch}.deb"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "setup: installing Vulkan 1.4.309 headers (Debian 13's $deb) into /usr/local/include"
  curl -fsSL -o "$tmp/$deb" "http://deb.debian.org/debian/pool/main/v/vulkan-loader/$deb"
  echo "$sum  $tmp/$deb" | sha256sum -c --quiet -
  dpkg-deb -x "$tmp/$deb" "$tmp/x"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO mkdir -p /usr/local/include
  $SUDO cp -r "$tmp/x/usr/include/vulkan" "$tmp/x/usr/include/vk_video" /usr/local/include/
  vulkan_headers_ok || { echo "setup: the Vulkan headers in /usr/local/include are still not usable" >&2; exit 1; }
fi
echo "setup: ok"
